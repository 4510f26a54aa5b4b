"""``RunPrecision``: which format a run is in, on which device, and the stepper that guards its steps.

``"auto"`` waits for the device (the model's, at setup) and then picks a format; a scaled format (fp16) gets an
``AdaptiveLossScaler`` built for that device (or the user's own, which must match it); the escalation ladder's
last resort moves an fp16 run to bf16. Everything that reads the precision (autocast, the statistics' dtype and
cadence, the fp32 defaults) reads ``format``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from lightning_mp._compat import scaler_device
from lightning_mp.errors import ConfigError
from lightning_mp.formats import Format, default_device, format_of, resolve_auto_precision
from lightning_mp.formats.base import default_dtype
from lightning_mp.options import PluginOptions
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.scaling.stepper import GuardedStep, ScaledStep

__all__ = ["RunPrecision"]


class RunPrecision:
    """The format in force and its stepper.

    Args:
        options: the validated knobs (``precision``, ``device``, ``scaler`` and the guard's).
        warn: how to tell the user something.
    """

    def __init__(self, options: PluginOptions, warn: Callable[[str], None]) -> None:
        self.options, self.warn = options, warn
        self.device = options.device_type
        self.format: Format | None = None  # None while "auto" waits for the device
        self.stepper: GuardedStep | ScaledStep = GuardedStep(options.guard_nonfinite, options.sharded_gradients)
        self.switched_to_bf16 = False
        user = options.scaler if isinstance(options.scaler, AdaptiveLossScaler) else None
        self._scaler_at_start = user.state_dict() if user is not None else None  # see restart_scaler
        if options.precision != "auto":
            self._use(format_of(options.precision), self.device or default_device())
        if self.device is not None:
            self.resolve(self.device)

    @property
    def name(self) -> str:
        """``"auto"`` until resolved, then the format's name (``"16-mixed"``, ...)."""
        return self.format.name if self.format is not None else "auto"

    @property
    def scaler(self) -> AdaptiveLossScaler | None:
        return self.stepper.scaler

    @scaler.setter
    def scaler(self, scaler: AdaptiveLossScaler) -> None:
        """Replace the loss scaler of a scaled format (what ``plugin.scaler = ...`` does)."""
        if self.format is None or not self.format.scaled:
            raise ConfigError(f"AdaptiveMP(precision={self.name!r}) has no loss scaler to replace.")
        self.stepper = ScaledStep(scaler, escalates=getattr(self.stepper, "escalates", True))

    def _use(self, fmt: Format, device: str) -> None:
        """Take ``fmt`` as the format in force, with its way of stepping on ``device``."""
        self.format = fmt
        if not fmt.scaled:
            if not isinstance(self.stepper, GuardedStep):
                self.stepper = GuardedStep(self.options.guard_nonfinite, self.options.sharded_gradients)
            return
        scaler = self.stepper.scaler
        if isinstance(self.options.scaler, AdaptiveLossScaler):
            scaler = self.options.scaler  # the user's: theirs to build for the right device
        elif scaler is None or scaler_device(scaler) != device:
            scaler = AdaptiveLossScaler(device, **self.options.scaler_knobs)
            if self.options.scaler_state:  # a torch.amp.GradScaler's scale and growth tracker carry over
                scaler.load_state_dict(self.options.scaler_state)
        escalates = scaler.on_floor is None or getattr(self.stepper, "escalates", False)
        if escalates:  # the core climbs its ladder at the floor; a user's own on_floor is theirs
            scaler.on_floor = _floor_noted
        if self.options.sharded_gradients:  # never unset what a user set on their own scaler
            scaler.sharded_gradients = True
        # "16-true" without fp32 masters: the gradients are fp16 and unscaled where they are (GradScaler refuses).
        scaler.allow_fp16_gradients = fmt.weights_dtype == torch.float16
        self.stepper = ScaledStep(scaler, escalates)

    def resolve(self, device: str | None) -> None:
        """Fix the format and its stepper once the device is known (``"auto"`` is decided here)."""
        if device is None:
            return
        self.device = device
        if self.format is None:
            fmt = format_of(resolve_auto_precision(device))
            if self.options.scaler is not None and not fmt.scaled:
                self.warn(f"AdaptiveMP(precision='auto') resolved to {fmt.name!r}: the scaler is unused.")
            self._use(fmt, device)
            return
        self._use(self.format, device)
        scaler = self.stepper.scaler
        if scaler is not None and scaler_device(scaler) != device:
            raise ConfigError(
                f"AdaptiveMP: the scaler was built for device {scaler_device(scaler)!r} but the model runs"
                f" on {device!r}; pass AdaptiveLossScaler(device={device!r}, ...)."
            )

    def switch_to_bf16(self) -> None:
        """The escalation ladder's rung: leave fp16 for bf16, which has fp32's range."""
        self._use(format_of("bf16-mixed"), self.device or default_device())
        self.switched_to_bf16 = True

    def restart_scaler(self) -> None:
        """A new fit with the same options: a scaler the user passed goes back to its state at construction."""
        if self._scaler_at_start is not None:
            self.options.scaler.load_state_dict(self._scaler_at_start)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The format's autocast; before setup, what the precision means on the CPU (setup still decides)."""
        device = self.device or "cpu"
        fmt = self.format or format_of(resolve_auto_precision(device))
        return fmt.autocast(device)

    @property
    def autocast_dtype(self) -> Any:
        return self.format.autocast_dtype if self.format is not None else None

    def init_context(self) -> contextlib.AbstractContextManager:
        """Where a model is built (``Trainer.init_module()``, ``fabric.init_module()``): low-precision weights are
        created in their dtype, as Lightning's ``HalfPrecision`` does; nothing otherwise."""
        dtype = self.weights_dtype
        return default_dtype(dtype) if dtype is not None else contextlib.nullcontext()

    @property
    def input_dtype(self) -> Any:
        """The dtype floating inputs are cast to: the autocast dtype, or the weights' (``None``: left alone)."""
        if self.format is None:
            return None
        return self.format.autocast_dtype or self.format.weights_dtype

    @property
    def weights_dtype(self) -> Any:
        return self.format.weights_dtype if self.format is not None else None

    @property
    def low_precision(self) -> bool:
        """The model computes in a low-precision dtype (autocast, or low-precision weights)."""
        return self.input_dtype is not None

    @property
    def stats_dtype(self) -> Any:
        return (self.format or format_of("32-true")).stats_dtype

    @property
    def stats_every(self) -> int:
        """The format's default statistics cadence (100 while ``"auto"`` is unresolved)."""
        return (self.format or format_of("32-true")).stats_every

    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.name,
            "switched_to_bf16": self.switched_to_bf16,
            "scaler": self.stepper.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A run the ladder moved to bf16 stays there; the scaler's state applies to the same precision only."""
        saved = state.get("precision")
        if state.get("switched_to_bf16") and self.name == "16-mixed":
            self.switch_to_bf16()
        if saved not in (None, self.name):
            self.warn(
                f"Resuming a {saved!r} checkpoint with AdaptiveMP(precision={self.name!r}): the saved"
                " loss-scaler state does not apply and is ignored; counters and promotions are kept."
            )
        elif saved == self.name and state.get("scaler"):
            self.stepper.load_state_dict(state["scaler"])


def _floor_noted(scaler: AdaptiveLossScaler) -> None:
    """The scaler's ``on_floor`` while the core owns it: nothing here (we are inside ``update()``); the core
    reads ``ScaleAction.FLOOR`` afterwards and climbs its escalation ladder with the step's event."""
