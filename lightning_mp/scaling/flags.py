"""What the scaler reads of an optimizer's gradients: which to unscale, and their overflow flags and largest
value on the one host synchronisation ``GradScaler.step`` makes anyway."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mp._grads import all_reduce, local

__all__ = ["gradients_to_unscale", "read_flags"]


def gradients_to_unscale(optimizer: torch.optim.Optimizer, allow_fp16: bool) -> list[torch.Tensor]:
    """The gradients ``GradScaler._unscale_grads_`` unscales: dense ones, and a sparse one's values (coalesced
    first in fp16, where summing duplicate indices may overflow and must be checked)."""
    grads = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if not allow_fp16 and param.grad.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            if param.grad.is_sparse:
                if param.grad.dtype is torch.float16:
                    param.grad = param.grad.coalesce()
                grads.append(param.grad._values())
            else:
                grads.append(param.grad)
    return grads


def read_flags(
    optimizer_state: dict[str, Any], device: torch.device, sharded: bool, scale: float
) -> tuple[bool, float | None]:
    """Read an optimizer's found-inf flags and its scaled amax with one host synchronisation; returns (found,
    the amax unscaled) and keeps them in the state as ``"host"`` for whoever asks next in this iteration."""
    values = [flag.to(device) for flag in optimizer_state["found_inf_per_device"].values()]
    scaled_amax = optimizer_state.get("scaled_amax")
    if scaled_amax is not None:
        values.append(scaled_amax.to(device))
    stacked = torch.stack([local(v) for v in values])
    if sharded:
        all_reduce(stacked)  # each rank checked only its shard: agree before deciding anything
    host = stacked.tolist()
    found = any(v != 0 for v in (host[:-1] if scaled_amax is not None else host))
    amax_value = host[-1] / scale if scaled_amax is not None else None
    optimizer_state["host"] = (found, amax_value)
    return found, amax_value
