"""lightning-mp: adaptive loss scaling, layer-wise FP32 fallback and overflow diagnostics for Lightning."""

from lightning_mp.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport
from lightning_mp.diagnostics import OverflowEvent
from lightning_mp.plugin import AdaptiveMP
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError, ScalePolicy, ScalerConfig

__all__ = [
    "AdaptiveLossScaler",
    "AdaptiveMP",
    "LossScaleFloorError",
    "LossScaleMonitor",
    "OverflowDiagnostics",
    "OverflowEvent",
    "PrecisionReport",
    "ScalePolicy",
    "ScalerConfig",
]
__version__ = "0.1.0"
