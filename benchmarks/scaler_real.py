"""Loss scalers in real fp16 training runs: each scaler trains the same model from the same seed on the same data.

Two architectures: the NLP recipe's Transformer classifier (d=32) and a small Hugging Face GPT-2 language model
(2 layers, d=64, built from a config: nothing downloaded) on token sequences from a fixed random Markov chain.
Scalers, all with the same ``growth_interval`` so the run covers many growth intervals:

- ``GradScaler``: Lightning's ``MixedPrecision`` with ``torch.amp.GradScaler``.
- ``predictive``: ``AdaptiveMP`` with the predictive policy alone (rescue and calibration off: version 0.2).
- ``dynamic + rescue``: GradScaler's own rule, with overflowing steps re-run at a lower scale instead of skipped.
- ``AdaptiveMP defaults``: predictive policy, spike-aware growth limit, calibrated start and rescue.

Per scaler: batches lost (steps skipped and not rescued), rescued steps, extra forward/backward passes
(beyond one per optimizer step: rescue re-runs and replays of bad steps), wasted passes (passes that produced
no weight update: extra passes plus skipped steps; GradScaler's are its skipped steps), median scale, time at
each scale, gradient underflow (parameter-gradient elements that are non-zero but below fp16's smallest normal
at the step's scale, sampled every 10 steps) and the final validation loss (fp32 evaluation).

    python -m benchmarks.scaler_real                  # both models, 2,000 steps per scaler (about 10 minutes)
    python -m benchmarks.scaler_real --models gpt2    # one model
    python -m benchmarks.scaler_real --quick          # NLP only, 200 steps, growth_interval 20
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import tempfile
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp.diagnosis.statistics import underflow_fraction
from lightning_mp.recipes.common import Classifier
from lightning_mp.recipes.nlp import TextData, TransformerClassifier


class ScaleProbe(L.Callback):
    """Records the scale each step's gradients carried and sampled gradient underflow."""

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
            if all(torch.isfinite(g).all() for g in grads):
                total = sum(g.numel() for g in grads)
                lost = sum(underflow_fraction(g, torch.float16, scale).item() * g.numel() for g in grads)
                self.underflow.append(lost / total)


class CountingGradScaler(torch.amp.GradScaler):
    """GradScaler plus a count of skipped steps (it has none of its own)."""

    skipped = 0

    def update(self, new_scale=None):
        found = sum(v.item() for s in self._per_optimizer_states.values() for v in s["found_inf_per_device"].values())
        self.skipped += bool(found)
        super().update(new_scale)


# ------------------------------------------------------------------------------------------------ models
class GPT2LM(L.LightningModule):
    """A small Hugging Face GPT-2 trained as a language model (AdamW, constant rate)."""

    def __init__(self, vocab: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=2)
        self.net = transformers.GPT2LMHeadModel(config)
        self.lr = lr

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.net(input_ids=tokens).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def markov_tokens(count: int, length: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """``count`` sequences from one fixed random Markov chain (4 likely successors per token): learnable text."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.randint(vocab, (vocab, 4), generator=chain)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (count,), generator=gen)
    for t in range(1, length):
        pick = torch.randint(4, (count,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return tokens


class Task:
    """One architecture: how to build its model and data, and its validation loss in fp32."""

    def __init__(self, name: str, build: Callable[[], tuple[L.LightningModule, object]], val_loss) -> None:
        self.name, self.build, self.val_loss = name, build, val_loss


def _nlp() -> Task:
    def build():
        data = TextData(train_size=4000, val_size=512, batch_size=32, seed=0)
        model = Classifier(TransformerClassifier(2000, 2, dim=32, heads=2, layers=1), num_classes=2, lr=1e-3)
        return model, data

    def val_loss(model, data):
        data.setup("validate")
        losses = [F.cross_entropy(model(x).float(), y, reduction="sum") for x, y in data.val_dataloader()]
        return float(sum(losses) / len(data.val_dataloader().dataset))

    return Task("NLP recipe Transformer (d=32)", build, val_loss)


def _gpt2() -> Task:
    def build():
        train = DataLoader(TensorDataset(markov_tokens(4000, seed=0)), batch_size=16, shuffle=True)
        return GPT2LM(), train

    def val_loss(model, data):
        return float(model.loss(markov_tokens(256, seed=1)))

    return Task("Hugging Face GPT-2 LM (2 layers, d=64)", build, val_loss)


TASKS = {"nlp": _nlp, "gpt2": _gpt2}


def scalers(growth_interval: int) -> dict[str, Callable[[], object]]:
    gi = growth_interval
    quiet = {"attach_callbacks": False}  # no console report per run (GradScaler's row has no callbacks either)
    return {
        "GradScaler": lambda: MixedPrecision("16-mixed", "cpu", scaler=CountingGradScaler("cpu", growth_interval=gi)),
        "predictive": lambda: AdaptiveMP(
            "16-mixed", scaler=AdaptiveLossScaler("cpu", growth_interval=gi, calibrate=False), rescue=False, **quiet
        ),
        "dynamic + rescue": lambda: AdaptiveMP(
            "16-mixed",
            scaler=AdaptiveLossScaler(
                "cpu", growth_interval=gi, policy="dynamic", hysteresis=1, min_scale=None, max_scale=None
            ),
            rescue=True,
            **quiet,
        ),
        "AdaptiveMP defaults": lambda: AdaptiveMP(
            "16-mixed", scaler=AdaptiveLossScaler("cpu", growth_interval=gi), **quiet
        ),
    }


def run(task: Task, plugin, steps: int, seed: int = 0) -> dict:
    L.seed_everything(seed, verbose=False)
    model, data = task.build()
    passes = [0]
    model.net.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
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
        callbacks=[probe],
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, data)
    ours = isinstance(plugin, AdaptiveMP)
    skipped = plugin.skipped_steps if ours else plugin.scaler.skipped
    rescued = plugin.ledger.rescued_steps if ours else 0
    extra = passes[0] - steps  # read before the validation forwards below
    model.eval()
    with torch.no_grad():
        val = task.val_loss(model.float(), data)
    at = collections.Counter(int(math.log2(s)) for s in probe.scales)
    return {
        "skipped": skipped,
        "lost": skipped,  # a rescued step is not skipped: what is skipped is lost
        "rescued": rescued,
        "extra_passes": extra,
        "wasted_passes": extra + skipped,
        "median_scale": statistics.median(probe.scales),
        "underflow": statistics.fmean(probe.underflow) if probe.underflow else float("nan"),
        "time_at_scale": {f"2^{k}": round(v / len(probe.scales), 3) for k, v in sorted(at.items())},
        "val_loss": val,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--growth-interval", type=int, default=100)
    parser.add_argument("--models", nargs="*", choices=sorted(TASKS), default=["nlp", "gpt2"])
    parser.add_argument("--scalers", nargs="*", default=None, help="rows to run (names as printed)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.growth_interval, args.models = 200, 20, ["nlp"]
    torch.set_num_threads(1)

    rows = []
    for key in args.models:
        task = TASKS[key]()
        table = [
            f"\n{task.name}: {args.steps} fp16 steps per scaler, growth_interval={args.growth_interval}, seed 0\n",
            "| scaler | batches lost | skipped | rescued | extra passes | wasted passes | median scale"
            " | underflow | final val loss | time at scale |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, make in scalers(args.growth_interval).items():
            if args.scalers and name not in args.scalers:
                continue
            row = {"model": key, "scaler": name, **run(task, make(), args.steps)}
            rows.append(row)
            share = ", ".join(f"{k} {v:.0%}" for k, v in row["time_at_scale"].items() if v >= 0.01)
            table.append(
                f"| {name} | {row['lost']} | {row['skipped']} | {row['rescued']} | {row['extra_passes']}"
                f" | {row['wasted_passes']} | 2^{math.log2(row['median_scale']):g} | {row['underflow']:.2e}"
                f" | {row['val_loss']:.4f} | {share} |"
            )
        print("\n".join(table))
        ref = next((r for r in rows if r["model"] == key and r["scaler"] == "GradScaler"), None)
        ours = next((r for r in rows if r["model"] == key and r["scaler"] == "AdaptiveMP defaults"), None)
        if ref and ours:
            print(
                f"defaults vs GradScaler: batches lost {ours['lost']} vs {ref['lost']}"
                f" (ratio {ours['lost'] / max(ref['lost'], 1):.3f}), wasted passes {ours['wasted_passes']} vs"
                f" {ref['wasted_passes']}, median scale 2^{math.log2(ours['median_scale']):g} vs"
                f" 2^{math.log2(ref['median_scale']):g}, val loss {ours['val_loss']:.4f} vs {ref['val_loss']:.4f}"
            )
    return rows


if __name__ == "__main__":
    main()
