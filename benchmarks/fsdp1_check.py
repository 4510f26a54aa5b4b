"""End-to-end check of ``AdaptiveFSDPMP`` under Lightning's FSDP1 strategy, which needs CUDA GPUs.

    python -m benchmarks.fsdp1_check --out fsdp1.json     # every visible GPU (Lightning starts one process each)
    python -m benchmarks.fsdp1_check --cpu-plumbing       # the same script with AdaptiveMP on CPU: plumbing only

For fp16 and bf16 a small MLP (Linear, Linear "middle", LayerNorm, Linear) trains 40 steps; on steps 5, 6
and 7 the middle layer's output overflows on the *last* rank only. Every rank writes what it decided, then
rank zero checks and prints: the run finished, every rank skipped the same steps with the same scale and
promoted the same modules, the overflow was attributed to ``middle`` in the forward phase and ``middle`` was
promoted to fp32, no local parameter shard is non-finite, and the loss went down.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveFSDPMP, AdaptiveMP

STEPS = 40
FAULT_STEPS = {5, 6, 7}


class ToyNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.middle = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 1)
        self.middle.register_forward_hook(self._overflow)
        self.losses: list[float] = []

    def _overflow(self, module, args, output):
        last_rank = self.trainer.global_rank == self.trainer.world_size - 1
        if self.training and last_rank and self.global_step + 1 in FAULT_STEPS:
            fault = torch.zeros_like(output)
            fault[0, 0] = float("inf")
            return output + fault
        return None

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.middle(torch.relu(self.first(x))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 32, 32, generator=gen)
    y = x[:, :4].sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def run(precision: str, out: Path, cpu_plumbing: bool) -> dict:
    torch.manual_seed(0)
    plugin_cls = AdaptiveMP if cpu_plumbing else AdaptiveFSDPMP
    plugin = plugin_cls(precision, device="cpu" if cpu_plumbing else "cuda", attach_callbacks=False)
    trainer = L.Trainer(
        accelerator="cpu" if cpu_plumbing else "cuda",
        devices=1 if cpu_plumbing else torch.cuda.device_count(),
        strategy="auto" if cpu_plumbing else "fsdp",
        plugins=[plugin],
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = ToyNet()
    trainer.fit(model, data())
    params = list(trainer.strategy.model.parameters())
    record = {
        "rank": trainer.global_rank,
        "skipped_steps": plugin.skipped_steps,
        "scale": plugin.scaler.get_scale() if plugin.scaler is not None else None,
        "fp32_modules": plugin.fp32_modules,
        "events": [[e.step, e.phase, e.module] for e in plugin.overflow_events],
        "finite": all(bool(torch.isfinite(p).all()) for p in params),
        "first_loss": model.losses[0],
        "last_loss": model.losses[-1],
    }
    (out / f"{precision}-rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return {}
    ranks = [json.loads((out / f"{precision}-rank{r}.json").read_text()) for r in range(trainer.world_size)]
    shared = ("skipped_steps", "scale", "fp32_modules", "events")  # what every rank must decide alike

    def decisions(record: dict) -> list:
        return [record[key] for key in shared]

    agree = all(decisions(r) == decisions(ranks[0]) for r in ranks)
    checks = {
        "ranks agree on skips, scale, promotions, events": agree,
        "overflow attributed to middle, forward": any(e[1:] == ["forward", "middle"] for e in ranks[0]["events"]),
        "middle promoted to fp32": "middle" in ranks[0]["fp32_modules"],
        "all parameter shards finite": all(r["finite"] for r in ranks),
        "loss went down": ranks[0]["last_loss"] < ranks[0]["first_loss"],
    }
    return {"precision": precision, "world_size": trainer.world_size, "checks": checks, "ranks": ranks}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON (rank zero)")
    parser.add_argument("--cpu-plumbing", action="store_true", help="AdaptiveMP on CPU: checks the script only")
    args = parser.parse_args(argv)
    if not args.cpu_plumbing and not torch.cuda.is_available():
        raise SystemExit("fsdp1_check: FSDP1 needs CUDA GPUs and none is visible (use --cpu-plumbing to dry-run).")
    # Every rank must write into the same folder: Lightning re-runs this script once per extra GPU, with
    # the environment of rank zero, so the folder is named in an environment variable rank zero sets.
    shared = os.environ.setdefault("FSDP1_CHECK_DIR", tempfile.mkdtemp(prefix="fsdp1_check_"))
    results = [r for r in (run(p, Path(shared), args.cpu_plumbing) for p in ("16-mixed", "bf16-mixed")) if r]
    for r in results:
        print(f"{r['precision']} on {r['world_size']} rank(s):")
        for name, ok in r["checks"].items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if results and args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
