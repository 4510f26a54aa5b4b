"""``PluginOptions``: every knob of ``AdaptiveMP``, validated once at construction.

Each error names the field, the value and what is allowed, in the form the CLI prints as its one line:
``AdaptiveMP(stats='most') is invalid: must be one of ('off', 'cheap', 'full').``
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_mp.precision import PRECISIONS
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.statistics import LEVELS

__all__ = ["GRADSCALER_RULE", "PluginOptions"]

_FLAGS = ("auto_fallback", "fp32_defaults", "guard_nonfinite", "attach_callbacks", "sharded_gradients", "replay")
_COUNTS = ("promote_after", "promote_window", "watch_steps", "max_consecutive_skips", "max_events", "stats_every")


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"AdaptiveMP({field}={value!r}) is invalid: {allowed}")


@dataclass(frozen=True, eq=False)
class PluginOptions:
    """The arguments of :class:`~lightning_mp.AdaptiveMP` (see its docstring for what each one does)."""

    precision: str = "auto"
    device: str | None = None
    scaler: AdaptiveLossScaler | Mapping[str, Any] | None = None
    fp32_modules: Any = ()
    auto_fallback: bool = True
    fp32_defaults: bool = True
    guard_nonfinite: bool = True
    promote_after: int = 2
    promote_window: int = 100
    watch_steps: int = 20
    max_consecutive_skips: int = 50
    max_events: int = 10_000
    stats: str = "cheap"
    stats_every: int | None = None
    attach_callbacks: bool = True
    sharded_gradients: bool = False
    replay: bool = True
    rescue: bool | None = None

    def __post_init__(self) -> None:
        precision, device, scaler = self.precision, self.device, self.scaler
        if precision not in PRECISIONS:
            raise _invalid("precision", precision, f"precision must be one of {PRECISIONS}.")
        if device is not None and not isinstance(device, str):
            raise _invalid("device", device, "device must be None or a device type string such as 'cuda' or 'cpu'.")
        if scaler is not None and not isinstance(scaler, (torch.amp.GradScaler, Mapping)):
            raise _invalid(
                "scaler",
                scaler,
                "scaler must be None, an AdaptiveLossScaler, a torch.amp.GradScaler (its settings and state carry"
                " over) or a dict of AdaptiveLossScaler's arguments.",
            )
        if _is_plain_gradscaler(scaler):
            warnings.warn(
                f"AdaptiveMP(scaler={type(scaler).__name__}(...)): its settings and state carry over into an"
                " AdaptiveLossScaler(policy='dynamic', hysteresis=1, min_scale=None, max_scale=None), which is"
                " GradScaler's own rule (the same scales, step for step) with overflow attribution added; pass"
                " scaler=None for the adaptive policy.",
                stacklevel=4,
            )
        if isinstance(scaler, Mapping):
            if "device" in scaler:
                raise ValueError("AdaptiveMP(scaler={'device': ...}) is invalid: the device is taken from AdaptiveMP.")
            AdaptiveLossScaler("cpu", **scaler)  # validate every knob now, naming the bad one
        if scaler is not None and precision in ("bf16-mixed", "32-true"):
            raise ValueError(
                f"AdaptiveMP(precision={precision!r}, scaler=...) is invalid: a loss scaler is only used with"
                " precision='16-mixed' (or 'auto'); pass scaler=None."
            )
        if self.stats not in LEVELS:
            raise _invalid("stats", self.stats, f"must be one of {LEVELS}.")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "must be True or False.")
        if self.rescue is not None and not isinstance(self.rescue, bool):
            raise _invalid("rescue", self.rescue, "must be None (on with the predictive scaler), True or False.")
        for name in _COUNTS:
            value = getattr(self, name)
            if name == "stats_every" and value is None:
                continue  # the default: see STATS_EVERY
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                allowed = "None (the default for the precision) or " if name == "stats_every" else ""
                raise _invalid(name, value, f"must be {allowed}an integer >= 1.")

    @property
    def device_type(self) -> str | None:
        """``"cuda"`` for ``"cuda:1"``; ``None`` until known."""
        return self.device.split(":")[0] if self.device else None

    @property
    def scaler_knobs(self) -> dict[str, Any]:
        """The arguments the scaler is built from at setup, for the model's device: a YAML config's dict, or a
        plain ``torch.amp.GradScaler``'s settings under its own rule."""
        if isinstance(self.scaler, Mapping):
            return dict(self.scaler)
        if _is_plain_gradscaler(self.scaler):
            return {
                "init_scale": self.scaler.get_scale(),
                "growth_factor": self.scaler.get_growth_factor(),
                "backoff_factor": self.scaler.get_backoff_factor(),
                "growth_interval": self.scaler.get_growth_interval(),
                "enabled": self.scaler.is_enabled(),
                **GRADSCALER_RULE,
            }
        return {}

    @property
    def scaler_state(self) -> dict[str, Any] | None:
        """A plain ``torch.amp.GradScaler``'s state, which the scaler built from it continues from."""
        return self.scaler.state_dict() if _is_plain_gradscaler(self.scaler) else None


# AdaptiveLossScaler's knobs that make it torch.amp.GradScaler's rule exactly.
GRADSCALER_RULE: dict[str, Any] = {"policy": "dynamic", "hysteresis": 1, "min_scale": None, "max_scale": None}


def _is_plain_gradscaler(scaler: Any) -> bool:
    return isinstance(scaler, torch.amp.GradScaler) and not isinstance(scaler, AdaptiveLossScaler)
