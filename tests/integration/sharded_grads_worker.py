"""Two gloo processes, each holding a different shard of one flat parameter (as FSDP1 gives every rank), with
an inf in rank 1's shard only on some steps. Writes what each rank decided, for test_fsdp1.py.

    python -m tests.integration.sharded_grads_worker OUT_DIR {sharded|unsharded}
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mp import AdaptiveFSDPMP, AdaptiveLossScaler
from lightning_mp._grads import gradients_nonfinite

STEPS = 12
FAULT_STEPS = {3, 4, 9}  # rank 1 only


def run(rank: int, out: Path, sharded: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank owns a different shard
    shard = torch.nn.Parameter(torch.randn(64))
    optimizer = torch.optim.SGD([shard], lr=0.01)
    scaler = AdaptiveLossScaler("cpu", init_scale=2.0**10, growth_interval=4, hysteresis=1)
    scaler.sharded_gradients = sharded
    # The bf16/fp32 guard of the FSDP1 plugin on the same shards (it marks its gradients as sharded).
    plugin = AdaptiveFSDPMP("bf16-mixed") if sharded else None
    decisions = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        scaler.scale((shard**2).sum()).backward()
        if rank == 1 and step in FAULT_STEPS:
            shard.grad[5] = float("inf")
        guard = gradients_nonfinite(optimizer, plugin.adaptive.core.options.sharded_gradients) if plugin else None
        before = scaler.skipped_steps
        scaler.step(optimizer)
        scaler.update()
        decisions.append({"skipped": scaler.skipped_steps > before, "scale": scaler.get_scale(), "guard": guard})
    (out / f"rank{rank}.json").write_text(json.dumps(decisions))
    # Leave without tearing gloo down: its teardown aborted a rank about one run in ten, after the results
    # were written ("terminate called without an active exception", a C++ thread still joinable at exit).
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    mp.spawn(run, args=(out_dir, mode == "sharded"), nprocs=2, join=True)
