"""The case that needs the low-bit fallback: one layer whose input carries outliers that the format cannot hold.

A token classifier over 16-token sequences (a teacher network labels every token; the held-out loss is measured on
tokens 1-15). Between its input projection and the next ``Linear`` (``mid``), one of two kinds of outlier is put
into the activations, then a LayerNorm after ``mid`` brings them back to scale, so only ``mid`` sees them:

- ``token``: token 0 of every sequence is multiplied by ``--outlier`` (1e5 by default): the "massive activations"
  of attention-sink tokens. Tensorwise fp8 maps that token's largest value onto e4m3's 448 and every other token
  falls below the format's smallest steps (row-wise scaling gives each token its own scale and is not hurt);
- ``channel``: channel 0 of every token is multiplied by ``--outlier`` (1e3 by default): a channel outlier, as
  LayerNorm gains produce. Row-wise int8 gives each token one scale, set by that channel, and every other value
  of the row rounds to zero; fp8's 17 binades hold a 1e3 spread.

Each configuration trains ``--steps`` AdamW steps under Lightning (bf16 autocast), three seeds, and is judged
against bf16 with the comparison's own rule (``lightning_mp.cli.verdict``, paired seeds):

- ``bf16``: Lightning's ``MixedPrecision("bf16-mixed")``, the reference;
- ``torchao``: torchao's own conversion of every eligible ``Linear``, under the same ``MixedPrecision``;
- ``torchao, mid in bf16``: the same without ``mid``, what a user who knew would write by hand;
- ``AdaptiveMP``: ``AdaptiveMP(fmt, low_bit_modules=[nn.Linear])`` (the same layers as ``torchao``), which has to
  find ``mid`` itself; the layers it moved back and the step of each are printed.

    python -m benchmarks.lowbit_outliers                       # fp8 token outliers and int8 channel outliers
    python -m benchmarks.lowbit_outliers --cases fp8:token --seeds 0 --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveMP
from lightning_mp.cli.verdict import verdict
from lightning_mp.lowbit.convert import fp8_config, ineligible

TOKENS, FEATURES, HIDDEN, CLASSES = 16, 64, 128, 8
DEFAULT_OUTLIER = {"token": 1e5, "channel": 1e3}


class OutlierTokens(L.LightningModule):
    """``inp -> GELU -> (outliers) -> mid -> LayerNorm -> GELU -> mid2 -> GELU -> out``, per token."""

    def __init__(self, kind: str = "token", outlier: float = 1e5, lr: float = 2e-3) -> None:
        super().__init__()
        self.kind, self.outlier, self.lr = kind, outlier, lr
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mid2 = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x))
        boost = torch.ones_like(h)
        if self.kind == "token":
            boost[:, 0, :] = self.outlier
        else:
            boost[:, :, 0] = self.outlier
        h = self.norm(self.mid(h * boost))
        return self.out(F.gelu(self.mid2(F.gelu(h))))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)[:, 1:].float()  # token 0 carries the outlier: scored on the others
        return F.cross_entropy(logits.reshape(-1, CLASSES), y[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def data(samples: int, seed: int) -> TensorDataset:
    """Gaussian tokens labelled by a fixed random teacher (the same teacher for every seed)."""
    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(FEATURES, 96, generator=teacher) / FEATURES**0.5
    w2 = torch.randn(96, CLASSES, generator=teacher) / 96**0.5
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, TOKENS, FEATURES, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return TensorDataset(x, y)


def held_out_loss(model: OutlierTokens, dataset: TensorDataset) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(dataset.tensors).item()
    model.train()
    return loss


def convert_with_torchao(model: nn.Module, fmt: str, skip: tuple[str, ...] = ()) -> None:
    """torchao's own conversion of every eligible ``Linear`` (dimensions divisible by 16: not ``out``, whose 8
    outputs are not), except ``skip``."""
    keep = lambda module, fqn: ineligible(module) is None and fqn not in skip  # noqa: E731
    if fmt == "fp8":
        from torchao.float8 import convert_to_float8_training

        # CPU: torchao's emulation mode, as AdaptiveMP uses there (lightning_mp.lowbit.convert explains why)
        convert_to_float8_training(model, module_filter_fn=keep, config=fp8_config("tensorwise", "cpu"))
    else:
        from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
        from torchao.quantization import quantize_

        quantize_(model, Int8MixedPrecisionTrainingConfig(module_swap=True), filter_fn=keep)


def run(fmt: str, kind: str, config: str, seed: int, steps: int, outlier: float) -> dict:
    torch.manual_seed(seed)
    model = OutlierTokens(kind, outlier)
    train = DataLoader(
        data(steps * 32, seed), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    plugin = None
    if config == "bf16":
        precision = MixedPrecision("bf16-mixed", "cpu")
    elif config.startswith("torchao"):
        convert_with_torchao(model, fmt, skip=("mid",) if "mid" in config else ())
        precision = MixedPrecision("bf16-mixed", "cpu")
    else:
        precision = plugin = AdaptiveMP(f"{fmt}-mixed", low_bit_modules=[nn.Linear], attach_callbacks=False)
    trainer = L.Trainer(
        max_steps=steps,
        plugins=[precision],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train)
    loss = held_out_loss(model, data(2048, 10_000 + seed))
    moved = [(p.module, p.step, p.detail) for p in plugin.promotions] if plugin is not None else []
    return {"val_loss": loss, "moved": moved, "seconds": time.perf_counter() - start, "seed": seed}


CONFIGS = ("bf16", "torchao", "torchao, mid in bf16", "AdaptiveMP")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=["fp8:token", "int8:channel"], help="format:outlier kind")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--outlier", type=float, default=None, help="the outlier factor (default: per kind)")
    args = parser.parse_args(argv)
    results = {}
    for case in args.cases:
        fmt, kind = case.split(":")
        outlier = args.outlier or DEFAULT_OUTLIER[kind]
        print(f"\n{fmt}, {kind} outliers x{outlier:g}, {args.steps} AdamW steps, seeds {args.seeds}", flush=True)
        runs = {}
        for config in CONFIGS:
            runs[config] = []
            for seed in args.seeds:
                result = run(fmt, kind, config, seed, args.steps, outlier)
                runs[config].append(result)
                moved = "; ".join(f"{m} at step {s} ({d})" for m, s, d in result["moved"])
                moved = f"moved back: {moved}" if moved else ""
                loss, seconds = result["val_loss"], result["seconds"]
                print(f"  {config:22} seed {seed}: held-out loss {loss:.4f}  {seconds:.0f} s  {moved}", flush=True)
        reference = [{"val_loss": r["val_loss"], "seed": r["seed"]} for r in runs["bf16"]]
        print(f"\n| {fmt}, {kind} outliers | held-out loss | vs bf16 | verdict (the comparison's rule) |")
        print("|---|---|---|---|")
        for config, rs in runs.items():
            losses = [r["val_loss"] for r in rs]
            mean = statistics.mean(losses)
            spread = f" +- {statistics.stdev(losses):.3f}" if len(losses) > 1 else ""
            diff = mean - statistics.mean(r["val_loss"] for r in reference)
            judged = "reference" if config == "bf16" else _verdict(rs, reference)
            print(f"| {config} | {mean:.3f}{spread} | {diff:+.3f} | {judged} |")
        results[case] = runs
    return results


def _verdict(runs: list[dict], reference: list[dict]) -> str:
    rows = [{"val_loss": r["val_loss"], "best_val_loss": r["val_loss"], "seed": r["seed"]} for r in runs]
    refs = [{**r, "best_val_loss": r["val_loss"]} for r in reference]
    return verdict(rows, refs, against="bf16")


if __name__ == "__main__":
    main()
