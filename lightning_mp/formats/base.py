"""``Format``: what one precision means to a training step, as data the core reads."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Format", "cast_own_tensors", "default_dtype"]


@dataclass(frozen=True)
class Format:
    """One precision.

    Attributes:
        name: Lightning's name (``"16-mixed"``): what ``AdaptiveMP(precision=...)`` takes and checkpoints keep.
        short: the name in messages (``"fp16"``).
        autocast_dtype: the dtype autocast computes in, or ``None`` (no autocast).
        scaled: the loss is scaled and a step is guarded by the loss scaler (fp16's narrow range); otherwise a
            step is guarded by the non-finite check (``scaling.stepper``).
        fp32_defaults: module types that run in fp32 by default (``fp32_defaults=True``), with the measured
            reason next to their definition.
        stats_every: the default statistics cadence, one optimizer step in this many (and the first step).
        low_bit: ``"fp8"`` or ``"int8"``: eligible ``Linear`` layers multiply in that format through torchao,
            each watched and moved back to the autocast dtype when the format hurts it (``lightning_mp.lowbit``);
            ``None`` for the autocast formats.
        weights_dtype: the dtype the model's weights (and its inputs) are stored in, as in Lightning's
            ``"bf16-true"`` / ``"16-true"``: no autocast, every operation runs in that dtype; ``None`` keeps fp32
            weights (``lightning_mp.weights`` watches and remedies the updates such weights lose).
    """

    name: str
    short: str
    autocast_dtype: torch.dtype | None
    scaled: bool
    fp32_defaults: tuple[type[nn.Module], ...]
    stats_every: int
    low_bit: str | None = None
    weights_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in: the autocast dtype, else the weights' dtype, else fp32."""
        return self.autocast_dtype or self.weights_dtype or torch.float32

    @property
    def stats_dtype(self) -> torch.dtype:
        """The format headroom and underflow are judged against: the dtype the model computes in."""
        return self.compute_dtype

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward's context on ``device_type``: autocast to the autocast dtype (``cache_enabled=False`` as in
        Lightning's ``MixedPrecision``: same kernels, same numbers); with low-precision weights, the default dtype
        set to theirs (tensors created in the forward match the weights, as in Lightning's ``HalfPrecision``);
        nothing for fp32."""
        if self.weights_dtype is not None:
            return default_dtype(self.weights_dtype)
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):  # noqa: ANN201 - a generator context manager
    """``torch.set_default_dtype(dtype)`` inside the block, the previous default restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_own_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    """``module``'s own floating parameters and buffers (fp64 left alone) in ``dtype``, in place, as
    ``module.to(dtype)`` does for them: the same ``Parameter`` objects (an optimizer keeps them), gradients
    follow, FSDP2's DTensor shards are swapped. ``nn.Module``'s own ``_apply``: subclasses such as torchmetrics'
    ``Metric`` override it without ``recurse``."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != torch.float64 else tensor

    nn.Module._apply(module, cast, recurse=False)
