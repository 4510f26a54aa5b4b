"""Two-process ModelParallelStrategy (FSDP2, gloo on CPU) run where only rank 1's data overflows fp16.

Run by tests/integration/test_ddp.py as ``python -m tests.integration.model_parallel_worker OUT_DIR``.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from tests.helpers import NaiveLogSumExp, TroubleNet
from tests.integration.ddp_worker import run


class ShardedTroubleNet(TroubleNet):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.inp, self.head):
            fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ShardedTroubleNet(NaiveLogSumExp(), lr=1e-4)
    run(Path(sys.argv[1]), model, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
