"""One object per precision: what the step autocasts to, whether it scales the loss, what runs in fp32 by
default, the format statistics are judged against, and how often they are sampled.

The core asks the format and never branches on the precision's name. A new format is a new file here, added to
``FORMATS``; ``"auto"`` is not a format but a choice among them, made once the device is known (``auto.py``).
"""

from __future__ import annotations

from typing import Literal

from lightning_mp.formats.auto import (
    cpu_has_native_bf16,
    cpu_has_native_fp16,
    default_device,
    emulated,
    resolve_auto_precision,
)
from lightning_mp.formats.base import Format
from lightning_mp.formats.bf16 import BF16
from lightning_mp.formats.fp16 import FP16
from lightning_mp.formats.fp32 import FP32
from lightning_mp.formats.lowbit import FP8, INT8
from lightning_mp.formats.true import BF16_TRUE, FP16_TRUE

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "Format",
    "PrecisionName",
    "cpu_has_native_bf16",
    "cpu_has_native_fp16",
    "default_device",
    "emulated",
    "format_of",
    "resolve_auto_precision",
]

FORMATS: dict[str, Format] = {f.name: f for f in (FP16, BF16, FP32, FP8, INT8, BF16_TRUE, FP16_TRUE)}
PRECISIONS: tuple[str, ...] = ("auto", *FORMATS)
PrecisionName = Literal["auto", "16-mixed", "bf16-mixed", "32-true", "fp8-mixed", "int8-mixed", "bf16-true", "16-true"]


def format_of(precision: str) -> Format:
    """The format of a resolved precision name (``"16-mixed"``, ``"bf16-mixed"``, ``"32-true"``, ``"fp8-mixed"``,
    ``"int8-mixed"``, ``"bf16-true"``, ``"16-true"``)."""
    return FORMATS[precision]
