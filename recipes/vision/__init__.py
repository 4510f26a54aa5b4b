"""Vision recipe: a small ResNet-style CNN with BatchNorm on procedurally drawn shapes or CIFAR-10.

Its names are imported on first use (PEP 562): ``knobs`` (what the recipe's config accepts) is read by the command
line's checks without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SmallResNet": "model",
    "VisionData": "data",
    "draw_shapes": "data",
    "load_cifar10": "data",
}
__all__ = ["SmallResNet", "VisionData", "draw_shapes", "load_cifar10"]  # == sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_mp.recipes.vision.data import VisionData, draw_shapes, load_cifar10
    from lightning_mp.recipes.vision.model import SmallResNet


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
