"""Two-process ModelParallelStrategy (FSDP2, gloo on CPU) run where only rank 1's data overflows fp16.

Run by tests/integration/test_ddp.py as ``python -m tests.integration.model_parallel_worker OUT_DIR``.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from tests.helpers import NaiveLogSumExp, TroubleNet
from tests.integration.ddp_worker import RankData


class ShardedTroubleNet(TroubleNet):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.inp, self.head):
            fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = ShardedTroubleNet(NaiveLogSumExp(), lr=1e-4)
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0), attach_callbacks=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        plugins=[plugin],
        use_distributed_sampler=False,  # each rank keeps its own data
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, datamodule=RankData())
    result = {
        "fp32_modules": plugin.fp32_modules,
        "skipped_steps": plugin.skipped_steps,
        "scale": plugin.scaler.get_scale(),
        "events": [(e.step, e.phase, e.module) for e in plugin.overflow_events],
        "weights": [v for p in model.parameters() for v in p.full_tensor().flatten().tolist()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
