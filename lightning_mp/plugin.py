"""``AdaptiveMP``: the Lightning precision plugin, and the only code that talks to Lightning's precision hooks.

Compared with Lightning's ``MixedPrecision`` it

* resolves ``precision="auto"`` at setup from the device the model landed on, and honours an explicit
  ``"16-mixed"`` on CPU (Lightning's connector silently turns CPU fp16 into bf16);
* scales fp16 losses with :class:`~lightning_mp.AdaptiveLossScaler`;
* guards bf16 and fp32 too: a step whose gradients are not finite is skipped, so weights never turn NaN;
* keeps step-interval LR schedulers in step with the optimizer: a skipped step does not advance them;
* saves its decisions (scaler state, counters) in the checkpoint and restores them before the first new step.

When nothing goes wrong the numerics are Lightning's: the same autocast context, the same unscale / clip /
step order, so weights match ``MixedPrecision`` bitwise.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_mp._grads import amax, optimizer_grads
from lightning_mp.scaling import AdaptiveLossScaler

__all__ = ["AdaptiveMP", "cpu_has_native_bf16", "resolve_auto_precision"]

PrecisionName = Literal["auto", "16-mixed", "bf16-mixed", "32-true"]
_PRECISIONS = ("auto", "16-mixed", "bf16-mixed", "32-true")
_AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    try:
        capability = torch._C._cpu._get_cpu_capability()
        if capability.get("avx512_bf16") or capability.get("amx_bf16"):
            return True
    except (AttributeError, RuntimeError):
        pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
    return False


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_auto_precision(device_type: str) -> str:
    """What ``precision="auto"`` means on a device: bf16 where it is native, else fp16 on CUDA, else fp32."""
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


class _SkipAwareScheduler:
    """Forwards everything to a step-interval LR scheduler, but drops ``step()`` after a skipped optimizer step.

    Lightning steps schedulers after every optimizer step, even one the scaler skipped; a warm-up then ends
    early by as many steps as were skipped. Wrapping the scheduler (instead of patching it) keeps its
    ``state_dict`` free of our code, and ``__class__`` keeps ``isinstance`` checks working.
    """

    def __init__(self, scheduler: Any, step_was_skipped: Callable[[Optimizer], bool]) -> None:
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "_step_was_skipped", step_was_skipped)
        object.__setattr__(self, "suppressed_steps", 0)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - makes isinstance(proxy, StepLR) true, as unittest.mock does
        return type(self._scheduler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._step_was_skipped(self._scheduler.optimizer):
            object.__setattr__(self, "suppressed_steps", self.suppressed_steps + 1)
            return None
        return self._scheduler.step(*args, **kwargs)


class AdaptiveMP(Precision):
    """Mixed precision for Lightning with adaptive loss scaling and a non-finite step guard.

    Use as ``Trainer(plugins=[AdaptiveMP()])`` and do not also pass ``Trainer(precision=...)``.

    Args:
        precision: ``"auto"`` (resolved at setup: bf16 where the device runs it natively, else fp16 on
            CUDA, else fp32), ``"16-mixed"``, ``"bf16-mixed"`` or ``"32-true"``.
        device: device type for autocast; ``None`` takes it from the model at setup.
        scaler: the :class:`AdaptiveLossScaler` for ``"16-mixed"``; ``None`` builds a default one. Must be
            ``None`` for ``"bf16-mixed"`` and ``"32-true"``.
        guard_nonfinite: skip bf16/fp32 steps whose gradients are not finite (fp16 is always guarded by the
            scaler). Costs one reduction over the gradients per step; on a GPU it also reads one flag
            on the host.

    Raises:
        ValueError: an unknown ``precision``, a ``scaler`` that is not an ``AdaptiveLossScaler``, or a scaler
            given with bf16 / fp32.
    """

    def __init__(
        self,
        precision: PrecisionName = "auto",
        device: str | None = None,
        scaler: AdaptiveLossScaler | None = None,
        *,
        guard_nonfinite: bool = True,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f"AdaptiveMP(precision={precision!r}) is invalid: precision must be one of {_PRECISIONS}.")
        if device is not None and not isinstance(device, str):
            raise ValueError(
                f"AdaptiveMP(device={device!r}) is invalid: device must be None or a device type string"
                " such as 'cuda' or 'cpu'."
            )
        if scaler is not None and not isinstance(scaler, AdaptiveLossScaler):
            raise ValueError(
                f"AdaptiveMP(scaler={scaler!r}) is invalid: scaler must be None or an AdaptiveLossScaler"
                " (AdaptiveLossScaler(policy='dynamic', hysteresis=1, min_scale=None, max_scale=None)"
                " reproduces torch.amp.GradScaler)."
            )
        if scaler is not None and precision in ("bf16-mixed", "32-true"):
            raise ValueError(
                f"AdaptiveMP(precision={precision!r}, scaler=...) is invalid: a loss scaler is only used with"
                " precision='16-mixed' (or 'auto'); pass scaler=None."
            )
        if not isinstance(guard_nonfinite, bool):
            raise ValueError(f"AdaptiveMP(guard_nonfinite={guard_nonfinite!r}) is invalid: must be True or False.")
        self.precision = precision
        self.device = device.split(":")[0] if device else None
        self.scaler = scaler
        # A scaler we built ourselves may be rebuilt for the model's device at setup; the user's may not.
        self._own_scaler = scaler is None
        self.guard_nonfinite = guard_nonfinite
        self._guard_skipped = 0
        self._last_step_skipped: dict[int, bool] = {}
        if precision == "16-mixed" and scaler is None:
            self.scaler = AdaptiveLossScaler(device=self.device or _default_device())
        if precision != "auto":
            self._resolve(self.device)

    # ------------------------------------------------------------------------------------- properties
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients, whatever the precision."""
        return self._guard_skipped + (self.scaler.skipped_steps if self.scaler is not None else 0)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES.get(self.precision)

    # ------------------------------------------------------------------------------------------ setup
    def _resolve(self, device: str | None) -> None:
        """Fix the precision, the autocast device and the scaler once the device is known."""
        if self.precision == "auto":
            if device is None:
                return  # wait for setup, where the model tells us its device
            self.precision = resolve_auto_precision(device)
            if self.scaler is not None and self.precision != "16-mixed":
                rank_zero_warn(f"AdaptiveMP(precision='auto') resolved to {self.precision!r}: the scaler is unused.")
                self.scaler = None
        if device is None:
            return
        self.device = device
        if self.precision == "16-mixed":
            if self.scaler is None or (self._own_scaler and self.scaler._device != device):
                self.scaler = AdaptiveLossScaler(device=device)
                self._own_scaler = True
            elif self.scaler._device != device:
                raise ValueError(
                    f"AdaptiveMP: the scaler was built for device {self.scaler._device!r} but the model runs on"
                    f" {device!r}; pass AdaptiveLossScaler(device={device!r}, ...)."
                )

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        # Called by every strategy after the model is on its device and the optimizers exist.
        if self.device is None or self.precision == "auto":
            param = next(model.parameters(), None)
            self._resolve(self.device or (param.device.type if param is not None else "cpu"))
        lr_schedulers = [self._skip_aware(config) for config in lr_schedulers]
        return model, optimizers, lr_schedulers

    def _skip_aware(self, config: Any) -> Any:
        if not isinstance(config, LRSchedulerConfig) or config.interval != "step" or config.reduce_on_plateau:
            return config
        if not isinstance(config.scheduler, _SkipAwareScheduler):
            config.scheduler = _SkipAwareScheduler(config.scheduler, self._step_was_skipped)
        return config

    def _step_was_skipped(self, optimizer: Optimizer) -> bool:
        return self._last_step_skipped.get(id(optimizer), False)

    # -------------------------------------------------------------------------------------- autocast
    def autocast_context_manager(self) -> contextlib.AbstractContextManager:
        if self.precision == "auto" or self.device is None:
            self._resolve(self.device or "cpu")  # used outside a Trainer, before setup
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False as in Lightning's MixedPrecision: same kernels, same numbers.
        return torch.autocast(self.device, dtype=dtype, cache_enabled=False)

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast for training, validation, test and predict steps."""
        with self.autocast_context_manager():
            yield

    # -------------------------------------------------------------------------------------- backward
    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        return super().pre_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizable,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if isinstance(optimizer, LBFGS):
            if self.scaler is not None:
                raise MisconfigurationException("AMP and the LBFGS optimizer are not compatible.")
            # LBFGS re-evaluates the closure inside step(): there is no point between backward and the update
            # where a guard could look, so bf16/fp32 LBFGS runs unguarded, exactly as in Lightning.
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if self.scaler is None and not self.guard_nonfinite:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)

        closure_result = closure()
        # In automatic optimization a training_step that returned None skipped backward: nothing to step.
        skip_backward = closure_result is None and model.automatic_optimization
        if self.scaler is not None and not skip_backward and not _optimizer_handles_unscaling(optimizer):
            # Unscale before on_before_optimizer_step and clipping, so both see true gradients.
            # Optimizers that unscale inside step() (fused Adam) cannot be clipped; see clip_gradients.
            self.scaler.unscale_(optimizer)  # type: ignore[arg-type]
        self._after_closure(model, optimizer)
        if skip_backward:
            return closure_result

        if self.scaler is not None:
            skipped_before = self.scaler.skipped_steps
            # The scaler skips optimizer.step() itself when the gradients are not finite.
            step_output = self.scaler.step(optimizer, **kwargs)  # type: ignore[arg-type]
            self.scaler.update()
            self._last_step_skipped[id(optimizer)] = self.scaler.skipped_steps > skipped_before
            return step_output

        # bf16 / fp32: no scaler, so check the gradients ourselves (after clipping: what would be applied).
        skipped = self._gradients_nonfinite(optimizer)  # type: ignore[arg-type]
        self._last_step_skipped[id(optimizer)] = skipped
        if skipped:
            self._guard_skipped += 1
            return closure_result
        optimizer.step(**kwargs)
        # What optimizer.step(closure) would have returned: the closure's result.
        return closure_result

    @staticmethod
    def _gradients_nonfinite(optimizer: Optimizer) -> bool:
        grads = optimizer_grads(optimizer)
        if not grads:
            return False
        # One reduction (inf-norm propagates inf and NaN), one flag read on the host.
        return not bool(torch.isfinite(amax(grads, grads[0].device)))

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val > 0 and _optimizer_handles_unscaling(optimizer):
            raise RuntimeError(
                f"The current optimizer, {type(optimizer).__qualname__}, does not allow for gradient clipping"
                " because it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer?"
            )
        super().clip_gradients(optimizer=optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "guard_skipped_steps": self._guard_skipped,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after setup and before the first new step, so the precision is resolved.
        saved = state_dict.get("precision")
        if saved not in (None, self.precision):
            rank_zero_warn(
                f"Resuming a {saved!r} checkpoint with AdaptiveMP(precision={self.precision!r}): the saved"
                " loss-scaler state does not apply and is ignored; counters are kept."
            )
        self._guard_skipped = int(state_dict.get("guard_skipped_steps", 0))
        scaler_state = state_dict.get("scaler")
        if self.scaler is not None and scaler_state and saved == self.precision:
            self.scaler.load_state_dict(scaler_state)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run started with Lightning's MixedPrecision keeps its GradScaler state under "MixedPrecision":
        # carry the scale over so switching to AdaptiveMP does not restart the scale search.
        if type(self).__qualname__ not in checkpoint and self.scaler is not None:
            legacy = checkpoint.get("MixedPrecision")
            if legacy:
                self.scaler.load_state_dict(legacy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, device={self.device!r}, scaler={self.scaler!r})"
