"""lightning-mp: adaptive loss scaling, layer-wise FP32 fallback and overflow diagnostics for Lightning."""

from pathlib import Path as _Path

from lightning_mp.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport
from lightning_mp.checkpoint import AtomicCheckpointIO
from lightning_mp.diagnostics import OverflowEvent
from lightning_mp.fsdp import AdaptiveFSDPMP
from lightning_mp.plugin import AdaptiveMP
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError, ScalePolicy, ScalerConfig

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
    "ScalePolicy",
    "ScalerConfig",
]
__version__ = "0.1.0"

# Installed, conf/ and recipes/ live inside this package (lightning_mp.conf, lightning_mp.recipes). In a source
# checkout they sit beside it at the top of the repository; let the same names resolve there, so code and
# tests run from a checkout see exactly what an install ships.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "recipes").is_dir() and (_root / "recipes" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - __path__ is defined for packages
