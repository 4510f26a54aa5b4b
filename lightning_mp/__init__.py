"""lightning-mp: adaptive loss scaling, layer-wise FP32 fallback and overflow diagnostics for Lightning.

The public names are imported on first use (PEP 562), so ``import lightning_mp`` and the ``lightning-mp``
command's argument checks and help do not pay for importing Lightning (about 5 s on a small CPU) until a run
needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AdaptiveFSDPMP": "lightning_mp.fsdp",
    "AdaptiveLossScaler": "lightning_mp.scaling",
    "AdaptiveMP": "lightning_mp.plugin",
    "AtomicCheckpointIO": "lightning_mp.checkpoint",
    "LossScaleFloorError": "lightning_mp.scaling",
    "LossScaleMonitor": "lightning_mp.reporting.callbacks",
    "OverflowDiagnostics": "lightning_mp.reporting.callbacks",
    "OverflowEvent": "lightning_mp.reporting.events",
    "PrecisionReport": "lightning_mp.reporting.callbacks",
    "ScaleAction": "lightning_mp.scaling",
    "ScalePolicy": "lightning_mp.scaling",
    "ScalerConfig": "lightning_mp.scaling",
    "fp32": "lightning_mp.fallback",
}

__all__ = [
    "AdaptiveFSDPMP",
    "AdaptiveLossScaler",
    "AdaptiveMP",
    "AtomicCheckpointIO",
    "LossScaleFloorError",
    "LossScaleMonitor",
    "OverflowDiagnostics",
    "OverflowEvent",
    "PrecisionReport",
    "ScaleAction",
    "ScalePolicy",
    "ScalerConfig",
    "fp32",
]  # == sorted(_EXPORTS); pinned by tests/test_packaging.py
__version__ = "0.1.0"

if TYPE_CHECKING:  # what static tools and IDEs see
    from lightning_mp.checkpoint import AtomicCheckpointIO
    from lightning_mp.fallback.islands import fp32
    from lightning_mp.fsdp import AdaptiveFSDPMP
    from lightning_mp.plugin import AdaptiveMP
    from lightning_mp.reporting.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport
    from lightning_mp.reporting.events import OverflowEvent
    from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError, ScaleAction, ScalePolicy, ScalerConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_mp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
