"""Small helpers over an optimizer's gradients, shared by the loss scaler and the plugin's guard.

Everything here stays on the device: results are 0-d tensors, never Python numbers, so calling these
helpers adds no host-device synchronisation. The caller decides when (and whether) to read them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

_INF = float("inf")


def optimizer_grads(optimizer: Optimizer) -> list[torch.Tensor]:
    """The gradients an optimizer would apply, as dense tensors (sparse gradients contribute their values)."""
    grads = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            grads.append(grad.coalesce()._values() if grad.is_sparse else grad)
    return grads


def group_by_device_and_dtype(
    tensors: Iterable[torch.Tensor],
) -> dict[torch.device, dict[torch.dtype, list[torch.Tensor]]]:
    """Split tensors into the per-device, per-dtype lists that ``torch._foreach_*`` kernels require."""
    groups: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for tensor in tensors:
        groups[tensor.device][tensor.dtype].append(tensor)
    return groups


def amax(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Largest absolute value over all ``tensors`` as a 0-d float32 tensor on ``device``.

    The result is ``inf`` if any element is infinite and ``nan`` if any is NaN (the infinity norm propagates
    both), so one reduction answers both "how large are the gradients?" and "are they all finite?".
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    partial = []
    for dev, by_dtype in group_by_device_and_dtype(tensors).items():
        for same in by_dtype.values():
            norms = torch._foreach_norm(same, _INF)
            partial.append(torch.stack(norms).max().float().to(device, non_blocking=dev != device))
    return torch.stack(partial).max() if len(partial) > 1 else partial[0]
