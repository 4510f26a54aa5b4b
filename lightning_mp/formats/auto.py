"""``"auto"``: which format a run uses on its device, and the CPU feature check behind it."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from lightning_mp._compat import cpu_capability

__all__ = ["cpu_has_native_bf16", "default_device", "resolve_auto_precision"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    capability = cpu_capability()
    if capability.get("avx512_bf16") or capability.get("amx_bf16"):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
    return False


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_auto_precision(device_type: str) -> str:
    """What ``precision="auto"`` means on a device: bf16 where it is native, else fp16 on CUDA, else fp32."""
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"
