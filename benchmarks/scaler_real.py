"""Loss scalers in a real fp16 training run: the NLP recipe's Transformer, trained twice from the same seed.

Once with Lightning's ``MixedPrecision`` and ``torch.amp.GradScaler``, once with ``AdaptiveMP`` and its
predictive ``AdaptiveLossScaler``, with the same ``growth_interval`` so the run covers many growth intervals.
For each: skipped steps, the share of steps spent at each scale, and the gradient underflow fraction
(parameter-gradient elements that are non-zero but below fp16's smallest normal at the step's scale,
measured every 10 steps on the unscaled gradients).

    python -m benchmarks.scaler_real            # 2,000 steps per scaler, growth_interval 100 (a few minutes)
    python -m benchmarks.scaler_real --quick    # 200 steps, growth_interval 20
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import tempfile

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_mp import AdaptiveLossScaler, AdaptiveMP, PrecisionReport
from lightning_mp.recipes.common import Classifier
from lightning_mp.recipes.nlp import TextData, TransformerClassifier
from lightning_mp.statistics import underflow_fraction


class ScaleProbe(L.Callback):
    """Records the scale of every optimizer step, which steps were skipped, and sampled gradient underflow."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.scales: list[float] = []
        self.underflow: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        scaler = trainer.precision_plugin.scaler
        scale = scaler.get_scale()
        self.scales.append(scale)
        if len(self.scales) % self.every == 0:
            # Both plugins have unscaled the gradients by now; put the scale back to judge them as fp16 saw them.
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            finite = all(torch.isfinite(g).all() for g in grads)
            if finite:
                total = sum(g.numel() for g in grads)
                lost = sum(underflow_fraction(g, torch.float16, scale).item() * g.numel() for g in grads)
                self.underflow.append(lost / total)


def run(plugin, steps: int, seed: int = 0) -> tuple[ScaleProbe, float]:
    L.seed_everything(seed, verbose=False)
    data = TextData(train_size=4000, val_size=64, batch_size=32, seed=seed)
    model = Classifier(TransformerClassifier(2000, 2, dim=32, heads=2, layers=1), num_classes=2, lr=1e-3)
    probe = ScaleProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[plugin],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tempfile.mkdtemp(prefix="lmp-scaler-real-"),
        callbacks=[probe, PrecisionReport(console=False)],
    )
    trainer.fit(model, datamodule=data)
    skipped = trainer.precision_plugin.skipped_steps if isinstance(plugin, AdaptiveMP) else None
    return probe, skipped


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--growth-interval", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.growth_interval = 200, 20
    torch.set_num_threads(1)

    class CountingGradScaler(torch.amp.GradScaler):
        """GradScaler plus a count of skipped steps (it has none of its own)."""

        skipped = 0

        def update(self, new_scale=None):
            found = sum(
                v.item() for s in self._per_optimizer_states.values() for v in s["found_inf_per_device"].values()
            )
            self.skipped += bool(found)
            super().update(new_scale)

    grad_scaler = CountingGradScaler("cpu", growth_interval=args.growth_interval)
    ref_probe, _ = run(MixedPrecision("16-mixed", "cpu", scaler=grad_scaler), args.steps)
    ours = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", growth_interval=args.growth_interval))
    our_probe, our_skipped = run(ours, args.steps)

    rows = []
    print(f"\n{args.steps} fp16 steps, growth_interval={args.growth_interval}, NLP recipe Transformer (d=32)")
    for name, probe, skipped in (
        ("GradScaler", ref_probe, grad_scaler.skipped),
        ("AdaptiveLossScaler", our_probe, our_skipped),
    ):
        at = collections.Counter(int(math.log2(s)) for s in probe.scales)
        share = {f"2^{k}": round(v / len(probe.scales), 3) for k, v in sorted(at.items())}
        row = {
            "scaler": name,
            "skipped": skipped,
            "median_scale": statistics.median(probe.scales),
            "underflow": statistics.fmean(probe.underflow) if probe.underflow else float("nan"),
            "time_at_scale": share,
        }
        rows.append(row)
        print(
            f"{name:20} skipped {skipped:4d}  median scale {row['median_scale']:>10g}  underflow {row['underflow']:.2e}"
            f"  time at scale {share}"
        )
    print(f"skipped steps, AdaptiveLossScaler / GradScaler: {rows[1]['skipped'] / max(rows[0]['skipped'], 1):.3f}")
    return rows


if __name__ == "__main__":
    main()
