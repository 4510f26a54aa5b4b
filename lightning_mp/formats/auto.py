"""``"auto"``: which format a run uses on its device, and the CPU feature check behind it."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from lightning_mp._compat import cpu_capability

__all__ = ["cpu_has_native_bf16", "cpu_has_native_fp16", "default_device", "emulated", "resolve_auto_precision"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    capability = cpu_capability()
    if capability.get("avx512_bf16") or capability.get("amx_bf16"):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
    return False


def cpu_has_native_fp16() -> bool:
    """Whether this CPU has fp16 arithmetic instructions (x86 AVX512-FP16 / AMX-FP16, Arm FP16)."""
    capability = cpu_capability()
    if capability.get("avx512_fp16") or capability.get("amx_fp16"):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " asimdhp" in Path("/proc/cpuinfo").read_text()
    return False


def emulated(precision: str, device_type: str) -> bool:
    """Whether ``precision``'s low-precision arithmetic is emulated on ``device_type`` (a CPU without the
    instructions converts to fp32 and back around every operation): its speed then says nothing about hardware
    that has them."""
    if device_type != "cpu":
        return False
    if precision in ("bf16-mixed", "bf16-true"):
        return not cpu_has_native_bf16()
    if precision in ("16-mixed", "16-true"):
        return not cpu_has_native_fp16()
    # No CPU multiplies fp8 natively (PyTorch's fp8 GEMM, `_scaled_mm`, has only a slow reference kernel on CPU), and
    # torchao's int8 training GEMM is written for GPUs: their CPU speed says nothing about a GPU's.
    return precision in ("fp8-mixed", "int8-mixed")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_auto_precision(device_type: str) -> str:
    """What ``precision="auto"`` means on a device: bf16 where it is native, else fp16 on CUDA, else fp32."""
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"
