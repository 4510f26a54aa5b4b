"""Two-process DDP run on CPU (gloo) where only rank 1's data overflows fp16; each rank writes what it decided.

Run by tests/integration/test_ddp.py as ``python -m tests.integration.ddp_worker OUT_DIR [rescue|spiky]``;
Lightning re-launches the same command for rank 1. With ``rescue`` the model's backward overflows at the
starting scale on both ranks instead (a gradient multiplied by 1e4), so every step is re-run at a lower scale.
With ``spiky`` the overflow on rank 1 is born in a block's own arithmetic (``helpers.Spiky``, 63% of the
parameters): both ranks must promote the same block's own code.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from tests.helpers import (
    ExplodingBackward,
    NaiveLogSumExp,
    SpikyRegressor,
    TroubleNet,
    loader,
    loader_with,
    trainer,
)


class RankData(L.LightningDataModule):
    """Rank 0 gets small inputs, rank 1 inputs large enough for exp() to overflow fp16 in the forward pass."""

    def train_dataloader(self):
        x, y = loader(samples=16).dataset.tensors
        factor = 1.5 if self.trainer.global_rank == 1 else 0.2
        return loader_with(x * factor, y, batch_size=2)


def two_ranks(plugins: list, strategy, out: Path, **kwargs) -> L.Trainer:
    """A quiet two-process CPU Trainer in which each rank keeps its own data."""
    return trainer(plugins, devices=2, strategy=strategy, use_distributed_sampler=False, default_root_dir=out, **kwargs)


def run(out: Path, model: L.LightningModule, strategy) -> None:
    """Fit ``model`` on two CPU processes with ``strategy``; each rank writes what it decided to OUT/rankN.json."""
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0))
    trainer = two_ranks([plugin], strategy, out)
    trainer.fit(model, datamodule=RankData())
    full = [getattr(p, "full_tensor", p.detach)() for p in model.parameters()]  # DTensor shards -> whole
    result = {
        "fp32_modules": plugin.fp32_modules,
        "scopes": [p.scope for p in plugin.promotions],
        "skipped_steps": plugin.skipped_steps,
        "rescued_steps": plugin.rescued_steps,
        "scale": plugin.scaler.get_scale(),
        "events": [(e.step, e.phase, e.module, e.op, e.source, e.reproduced) for e in plugin.overflow_events],
        "weights": [v for p in full for v in p.detach().flatten().tolist()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class RankOutliers(L.Callback):
    """fp8: only rank 1's model feeds ``mid`` a massive token (benchmarks.lowbit_outliers)."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.outlier = 1e5 if trainer.global_rank == 1 else 1.0


def run_fp8(out: Path) -> None:
    """Two ranks, fp8: rank 1 alone measures ``mid``'s underflow; both must move it back at the same step."""
    from torch import nn
    from torch.utils.data import DataLoader

    from benchmarks.lowbit_outliers import OutlierTokens, data

    model = OutlierTokens("token", outlier=1.0)
    plugin = AdaptiveMP("fp8-mixed", low_bit_modules=[nn.Linear], stats_every=2)
    trainer = two_ranks([plugin], "ddp", out, callbacks=[RankOutliers()])
    trainer.fit(model, DataLoader(data(48, 0), batch_size=8))
    result = {
        "moved": [(p.module, p.step, str(p.reason)) for p in plugin.promotions],
        "low_bit_layers": plugin.low_bit_layers,
        "weights": [v for p in model.parameters() for v in p.detach().flatten().tolist()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[2:] == ["fp8"]:
        run_fp8(Path(sys.argv[1]))
    elif sys.argv[2:] == ["rescue"]:
        run(Path(sys.argv[1]), TroubleNet(ExplodingBackward(1e4), lr=1e-6), strategy="ddp")
    elif sys.argv[2:] == ["spiky"]:
        run(Path(sys.argv[1]), SpikyRegressor(gain=1e5, lr=1e-4), strategy="ddp")
    else:
        run(Path(sys.argv[1]), TroubleNet(NaiveLogSumExp(), lr=1e-4), strategy="ddp")
