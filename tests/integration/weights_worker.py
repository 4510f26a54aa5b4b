"""Two-process bf16-true runs on CPU (gloo) under DDP or ModelParallelStrategy (FSDP2), each rank with its own
data; each rank writes its weights, its remedy's state and its lost-update figures.

Run by tests/integration/test_ddp.py as ``python -m tests.integration.weights_worker OUT_DIR ddp|fsdp2 REMEDY``.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_mp import AdaptiveMP
from tests.integration.ddp_worker import RankData, two_ranks
from tests.integration.test_weights_in_trainer import AdamWRegressor


class ShardedRegressor(AdamWRegressor):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self, mesh=mesh)


def _full(tensor):
    return getattr(tensor, "full_tensor", tensor.detach)().detach().float().flatten().tolist()


def run(out: Path, strategy_name: str, remedy: str) -> None:
    sharded = strategy_name == "fsdp2"
    model = (ShardedRegressor if sharded else AdamWRegressor)(lr=1e-4)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    plugin = AdaptiveMP("bf16-true", master_weights=None if remedy == "none" else remedy, stats_every=1)
    trainer = two_ranks([plugin], strategy, out, max_steps=6)
    trainer.fit(model, datamodule=RankData())
    weights = plugin.core.weights
    masters = [m for copies in weights.masters.values() for _, m in copies.pairs]
    result = {
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "remedies": weights.remedies,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "weights": [v for p in model.parameters() for v in _full(p)],
        "masters": [v for m in masters for v in _full(m)],
        "lost": weights.lost.mean(),
        "share_of_fp32": weights.memory.get("share_of_fp32"),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.manual_seed(0)
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
