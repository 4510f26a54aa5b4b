"""AdaptiveMP for Lightning's ``FSDPStrategy`` (FSDP1, ``strategy="fsdp"``, CUDA only).

Lightning's FSDP1 strategy accepts only ``FSDPPrecision`` plugins, so ``AdaptiveMP`` alone is refused there.
``AdaptiveFSDPMP`` *is* an ``AdaptiveMP`` (the same scaler, non-finite guard, attribution, fp32 fallback,
escalation ladder, checkpoint state and callbacks) that is also an ``FSDPPrecision``:

    Trainer(accelerator="cuda", devices=8, strategy="fsdp", plugins=[AdaptiveFSDPMP("bf16-mixed")])

Two things differ from ``AdaptiveMP`` under DDP or ``ModelParallelStrategy`` (FSDP2, which takes the plain
``AdaptiveMP``):

- FSDP1's gradients are flat-parameter shards, plain tensors (FSDP2's are DTensors, which the scaler
  recognises by itself), so every rank sees only its shard: the found-inf flags, the gradient amax and the
  bf16/fp32 guard's flag are all-reduced before any rank steps or skips (``scaler.sharded_gradients``).
- ``mixed_precision_config`` keeps FSDP's own casting off (parameters gathered, and gradients reduced, in
  fp32); autocast does the low-precision compute, exactly as under DDP. Lightning's ``FSDPPrecision``
  gathers fp16/bf16 parameters instead, which halves the gather volume but makes fp32 islands impossible
  (an island's fp32 inputs would meet fp16 weights) and reduces gradients in 16 bits. The fallback and the
  fp16-to-bf16 switch of the escalation ladder need the fp32 parameters.

FSDP1 does not run on CPU (torch raises "FSDP needs a non-CPU accelerator device"; Lightning refuses
``strategy="fsdp"`` without a GPU). The tests check on CPU what can be checked there: that Lightning's FSDP
strategy accepts the plugin, the FSDP mixed-precision config, and the cross-rank agreement on sharded
plain-tensor gradients in two gloo processes. ``benchmarks/gpu.py --fsdp1`` is the end-to-end check on GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from typing_extensions import override

from lightning_mp.plugin import AdaptiveMP
from lightning_mp.scaling import AdaptiveLossScaler

__all__ = ["AdaptiveFSDPMP"]


class AdaptiveFSDPMP(AdaptiveMP, FSDPPrecision):
    """``AdaptiveMP`` for ``Trainer(strategy="fsdp")``; see the module docstring for what differs.

    Args:
        precision: as ``AdaptiveMP``; ``"auto"`` is resolved here for ``device`` (FSDP wraps the model before
            the plugin sees it, with the precision fixed).
        device: ``"cuda"`` (FSDP1 runs nowhere else).
        scaler, fp32_modules, auto_fallback, **knobs: as ``AdaptiveMP``.
    """

    _sharded_gradients = True

    def __init__(
        self,
        precision: str = "auto",
        device: str = "cuda",
        scaler: AdaptiveLossScaler | dict[str, Any] | None = None,
        fp32_modules: Any = (),
        auto_fallback: bool = True,
        **knobs: Any,
    ) -> None:
        if device is None or device.split(":")[0] != "cuda":
            raise ValueError(f"AdaptiveFSDPMP(device={device!r}) is invalid: FSDP1 runs only on 'cuda'.")
        super().__init__(precision, device, scaler, fp32_modules, auto_fallback, **knobs)
        self._resolve(self.device)
        # What FSDPPrecision.__init__ would have set (it is not called: it would build a ShardedGradScaler).
        self._desired_input_dtype = torch.float32

    @property
    @override
    def mixed_precision_config(self) -> Any:
        """No FSDP-level casting: fp32 parameters in forward (autocast does the rest), fp32 reductions."""
        from torch.distributed.fsdp import MixedPrecision as FSDPMixedPrecision

        return FSDPMixedPrecision(param_dtype=None, reduce_dtype=None, buffer_dtype=None)
