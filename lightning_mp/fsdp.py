"""``AdaptiveFSDPMP``: ``AdaptiveMP`` for Lightning's ``FSDPStrategy`` (FSDP1, ``strategy="fsdp"``, CUDA only).

Lightning's FSDP1 strategy accepts only ``FSDPPrecision`` plugins, so ``AdaptiveMP`` alone is refused there.
``AdaptiveFSDPMP`` is an ``FSDPPrecision`` that *holds* an ``AdaptiveMP`` (``plugin.adaptive``) and hands every
precision hook to it: the same scaler, non-finite guard, attribution, fp32 fallback, escalation ladder,
checkpoint state and callbacks, with no copy of their logic:

    Trainer(accelerator="cuda", devices=8, strategy="fsdp", plugins=[AdaptiveFSDPMP("bf16-mixed")])

Its ``FSDPPrecision`` side is initialised as ``"32-true"``: FSDP's own casting stays off (parameters gathered,
and gradients reduced, in fp32; inputs fp32; no ``ShardedGradScaler``); autocast does the low-precision
compute, exactly as under DDP. Lightning's ``FSDPPrecision("bf16-mixed")`` gathers bf16 parameters instead,
which halves the gather volume but makes fp32 islands impossible (an island's fp32 inputs would meet bf16
weights) and reduces gradients in 16 bits; the fallback and the fp16-to-bf16 rung need the fp32 parameters.

FSDP1's gradients are flat-parameter shards, plain tensors (FSDP2's are DTensors, which the scaler recognises
by itself), so the inner plugin is built with ``sharded_gradients=True``: found-inf flags, the gradient amax
and the guard's flag are all-reduced before any rank steps or skips.

FSDP1 does not run on CPU (torch raises "FSDP needs a non-CPU accelerator device"; Lightning refuses
``strategy="fsdp"`` without a GPU). The tests check on CPU what can be checked there; ``python -m
benchmarks.fsdp1_check`` is the end-to-end check on GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mp.errors import ConfigError
from lightning_mp.plugin import AdaptiveMP, refuse_clipping_fused
from lightning_mp.scaling import AdaptiveLossScaler

__all__ = ["AdaptiveFSDPMP"]


class _InnerAttribute:
    """``precision`` and ``scaler`` of the shell are the inner plugin's. ``FSDPPrecision.__init__("32-true")``
    sets and reads back FSDP's own values before the inner plugin exists; those are kept as ``_fsdp_<name>``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, shell: Any, owner: type | None = None) -> Any:
        if shell is None:
            return self
        inner = shell.__dict__.get("adaptive")
        return getattr(inner, self.name) if inner is not None else shell.__dict__[f"_fsdp_{self.name}"]

    def __set__(self, shell: Any, value: Any) -> None:
        inner = shell.__dict__.get("adaptive")
        if inner is None:
            shell.__dict__[f"_fsdp_{self.name}"] = value
        else:
            setattr(inner, self.name, value)  # AdaptiveMP.precision is read-only: that raises


class AdaptiveFSDPMP(FSDPPrecision):
    """``AdaptiveMP`` for ``Trainer(strategy="fsdp")``; see the module docstring for what differs.

    ``precision``, ``scaler`` and every read-only attribute of ``AdaptiveMP`` (``skipped_steps``,
    ``overflow_events``, ``fp32_modules``, ``promotions``, ``ledger``, ...) are the inner ``AdaptiveMP``'s.

    Args:
        precision: as ``AdaptiveMP``; ``"auto"`` is resolved here for ``device`` (FSDP wraps the model before
            the plugin sees it, with the precision fixed).
        device: ``"cuda"`` (FSDP1 runs nowhere else).
        scaler, fp32_modules, auto_fallback, **knobs: as ``AdaptiveMP``.
    """

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
        if precision in ("bf16-true", "16-true"):
            raise ConfigError(
                f"AdaptiveFSDPMP(precision={precision!r}) is not supported: FSDP1's flat parameters are built before"
                " the plugin could convert the weights; use DDP or ModelParallelStrategy (FSDP2) with AdaptiveMP,"
                " or 'bf16-mixed' / '16-mixed' here."
            )
        if precision in ("fp8-mixed", "int8-mixed"):
            raise ConfigError(
                f"AdaptiveFSDPMP(precision={precision!r}) is not supported: torchao converts layers before FSDP wraps"
                " them, and FSDP1's flat parameters hide them; use DDP, or FSDP2 with layers you convert yourself."
            )
        super().__init__("32-true")  # FSDP's side: no casting, fp32 inputs, no ShardedGradScaler
        knobs = {**knobs, "sharded_gradients": True}  # FSDP1's flat-parameter shards: flags agreed across ranks
        adaptive = AdaptiveMP(precision, device, scaler, fp32_modules, auto_fallback, **knobs)
        adaptive.core.setting.resolve(adaptive.device)  # "auto" means what it means on CUDA, now
        self.adaptive = adaptive

    precision = _InnerAttribute()
    scaler = _InnerAttribute()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the read-only state of the inner plugin (skipped_steps,
        # overflow_events, overflow_counts, fp32_modules, promotions, ledger, statistics, optimizer_steps, ...).
        adaptive = self.__dict__.get("adaptive")
        if adaptive is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(adaptive, name)

    @property
    @override
    def mixed_precision_config(self) -> Any:
        """No FSDP-level casting: fp32 parameters in forward (autocast does the rest), fp32 reductions."""
        from torch.distributed.fsdp import MixedPrecision as FSDPMixedPrecision

        return FSDPMixedPrecision(param_dtype=None, reduce_dtype=None, buffer_dtype=None)

    # ----------------------------------------------------------------- every precision hook: the inner plugin
    @override
    def connect(self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> Any:
        return self.adaptive.connect(model, optimizers, lr_schedulers)

    @override
    def teardown(self) -> None:
        self.adaptive.teardown()

    @override
    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.adaptive.forward_context()

    @override
    def train_step_context(self) -> contextlib.AbstractContextManager:  # type: ignore[override]
        return self.adaptive.train_step_context()

    @override
    def val_step_context(self) -> contextlib.AbstractContextManager:  # type: ignore[override]
        return self.adaptive.val_step_context()

    @override
    def convert_input(self, data: Any) -> Any:
        return self.adaptive.convert_input(data)

    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        return self.adaptive.pre_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizable, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        return self.adaptive.optimizer_step(optimizer, model, closure, **kwargs)

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # FSDPPrecision's own clipping: by value works on the shards, by norm is refused (it needs FSDP's).
        refuse_clipping_fused(optimizer, clip_val)
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.adaptive.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adaptive.load_state_dict(state_dict)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.adaptive.on_load_checkpoint(checkpoint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.adaptive!r})"
