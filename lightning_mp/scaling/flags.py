"""What the scaler reads of an optimizer's gradients: which to unscale, and their overflow flags and largest
value on the one host synchronisation ``GradScaler.step`` makes anyway."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mp._grads import all_reduce, local

__all__ = ["DeferredFlags", "gradients_to_unscale", "read_flags"]


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


def _stacked(optimizer_state: dict[str, Any], device: torch.device, sharded: bool) -> torch.Tensor:
    """An optimizer's found-inf flags, then its scaled amax if tracked, in one tensor (agreed across ranks)."""
    values = [flag.to(device) for flag in optimizer_state["found_inf_per_device"].values()]
    if optimizer_state.get("scaled_amax") is not None:
        values.append(optimizer_state["scaled_amax"].to(device))
    stacked = torch.stack([local(v) for v in values])
    if sharded:
        all_reduce(stacked)  # each rank checked only its shard: agree before deciding anything
    return stacked


def _decode(host: list[float], has_amax: bool, scale: float) -> tuple[bool, float | None]:
    found = any(v != 0 for v in (host[:-1] if has_amax else host))
    return found, host[-1] / scale if has_amax else None


def read_flags(
    optimizer_state: dict[str, Any], device: torch.device, sharded: bool, scale: float
) -> tuple[bool, float | None]:
    """Read an optimizer's found-inf flags and its scaled amax with one host synchronisation; returns (found,
    the amax unscaled) and keeps them in the state as ``"host"`` for whoever asks next in this iteration."""
    host = _stacked(optimizer_state, device, sharded).tolist()
    optimizer_state["host"] = _decode(host, optimizer_state.get("scaled_amax") is not None, scale)
    return optimizer_state["host"]


class DeferredFlags:
    """An iteration's flags kept for later: a fused optimizer unscales and skips inside its kernel, and GradScaler's
    fused path reads nothing on the host in that iteration. They are gathered and copied to the host right away,
    behind the iteration's own work (pinned memory and an event on a GPU), and read when the next iteration needs
    the scale (``scale()``, ``get_scale()``, a checkpoint): that read waits for nothing newer.

    Args:
        states: the per-optimizer states of the iteration (their flags and scaled amax).
        device, sharded, scale: as for ``read_flags``.
    """

    def __init__(self, states: list[dict[str, Any]], device: torch.device, sharded: bool, scale: float) -> None:
        self.states = states  # refreshed, not reused, by the scaler's update
        self.scale = scale
        self.ready = all("host" in state for state in states)  # read already (an unfused step's sync)
        self._copies: dict[int, torch.Tensor] = {}
        for index, state in enumerate(self.states):
            if "host" not in state:
                stacked = _stacked(state, device, sharded)
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=stacked.is_cuda)
                self._copies[index] = host.copy_(stacked, non_blocking=True)
        self._event = torch.cuda.Event() if device.type == "cuda" and not self.ready else None
        if self._event is not None:
            self._event.record()
        self._read: tuple[bool, list[float], int] | None = None

    def read(self) -> tuple[bool, list[float], int]:
        """(any overflow, the unscaled amaxes, the steps a fused optimizer skipped on its own), read once."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            found_any, amaxes, skips = False, [], 0
            for index, state in enumerate(self.states):
                if "host" in state:
                    found, amax_value = state["host"]
                else:
                    has_amax = state.get("scaled_amax") is not None
                    found, amax_value = _decode(self._copies[index].tolist(), has_amax, self.scale)
                # A fused optimizer's step() skips itself on found_inf, without _maybe_opt_step counting it.
                skips += found and state.get("stepped", False) and not state.get("skip_counted")
                found_any = found_any or found
                if amax_value is not None:
                    amaxes.append(amax_value)
            self._read = (found_any, amaxes, skips)
        return self._read
