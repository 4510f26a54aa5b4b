"""lightning-mp: adaptive loss scaling, layer-wise FP32 fallback and overflow diagnostics for Lightning."""

from lightning_mp.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport
from lightning_mp.checkpoint import AtomicCheckpointIO
from lightning_mp.fallback import fp32
from lightning_mp.fsdp import AdaptiveFSDPMP
from lightning_mp.ledger import OverflowEvent
from lightning_mp.plugin import AdaptiveMP
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError, ScaleAction, ScalePolicy, ScalerConfig

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
]
__version__ = "0.1.0"
