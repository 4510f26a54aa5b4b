"""Watching each low-bit layer on sampled steps: range, underflow, saturation and the GEMM's error.

On a sampled step every converted layer's forward is observed once (a forward hook) and its output gradient
once (a tensor hook). Each operand of its GEMM (the input, the weight, the output gradient) is put through the
format's own quantization, torchao's functions with the layer's own settings (fp8: ``tensor_to_scale`` and
``to_fp8_saturated`` at the recipe's dtype and granularity; int8: ``quantize_int8_rowwise``), and measured:

- ``amax``: the largest magnitude, the value the dynamic scale maps onto the format's largest (e4m3 448, e5m2
  57344, int8 127 per row);
- ``underflow``: the share of the non-zero elements that quantize to zero. Dynamic scaling puts the largest value
  at the top of the range, so one huge value (a "massive activation" of an attention-sink token, a channel
  outlier under row-wise int8) pushes everything else below the smallest step: this is how the formats fail in
  practice, and it is a trigger of its own;
- ``saturation``: the share of elements beyond the format's largest value after scaling (0 under dynamic
  scaling unless the scale is rounded; shown so that a recipe where it is not 0 is seen);
- ``snr_db``: the GEMM's signal-to-noise ratio against a bf16 reference of the same call
  (``F.linear`` on the bf16 operands), per output row, the median over rows: one row with huge values would
  otherwise hide every other row's error in a global ratio.

Values stay on the device until ``collect`` reads them once per sampled step. Memory is O(layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FORMAT_RANGE", "LayerSample", "LowBitWatch", "gemm_snr_db"]

# The largest value of each operand's format, what ``amax`` is mapped onto.
FORMAT_RANGE = {"e4m3": 448.0, "e5m2": 57344.0, "int8": 127.0}


@dataclass
class LayerSample:
    """One sampled step of one low-bit layer (``None``: not measured, e.g. no backward through it)."""

    step: int
    input_amax: float
    weight_amax: float
    input_underflow: float
    weight_underflow: float
    saturation: float
    snr_db: float
    grad_amax: float | None = None
    grad_underflow: float | None = None
    finite: bool = True  # the operands and the output were finite (a sample that is not is not judged)

    @property
    def underflow(self) -> float:
        """The worst underflow share over the operands measured."""
        return max(v for v in (self.input_underflow, self.weight_underflow, self.grad_underflow) if v is not None)


def gemm_snr_db(output: Tensor, reference: Tensor) -> Tensor:
    """Median over output rows of 10 log10(|reference|^2 / |output - reference|^2), on the device; rows whose
    reference is all zero are left out, and an exact row counts as 100 dB."""
    ref = reference.detach().float().reshape(-1, reference.shape[-1])
    err = output.detach().float().reshape(-1, reference.shape[-1]) - ref
    signal, noise = ref.pow(2).sum(-1), err.pow(2).sum(-1)
    rows = 10 * torch.log10(signal / noise.clamp_min(1e-30)).clamp(max=100.0)
    rows = rows[signal > 0]
    return rows.median() if rows.numel() else torch.tensor(100.0, device=ref.device)


class _Quantizer:
    """The format's own quantization of one GEMM operand, for measuring (never used for training)."""

    def __init__(self, kind: str, module: nn.Module) -> None:
        self.kind = kind
        self.config = getattr(module, "config", None)  # fp8: the layer's Float8LinearConfig

    def _fp8(self, x: Tensor, cast: Any) -> tuple[Tensor, Tensor]:
        from torchao.float8.config import ScalingGranularity
        from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

        axiswise = cast.scaling_granularity is ScalingGranularity.AXISWISE
        dtype = cast.target_dtype
        scale = tensor_to_scale(
            x,
            dtype,
            scaling_granularity=cast.scaling_granularity,
            axiswise_dim=-1 if axiswise else None,
            round_scales_to_power_of_2=self.config.round_scales_to_power_of_2,  # the rowwise recipes round
        )
        scaled = x.float() * scale
        quantized = to_fp8_saturated(scaled, dtype)
        # The dynamic scale maps amax onto the largest value; its own float rounding can land a hair above it.
        return quantized, scaled.abs() > torch.finfo(dtype).max * (1 + 2**-10)

    def __call__(self, x: Tensor, role: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(amax, underflow share, saturation share)`` of the 2-D operand ``x``; ``role`` is ``"input"``,
        ``"weight"`` or ``"grad"``."""
        x = x.detach()
        nonzero = x != 0
        if self.kind == "fp8":
            cast = {
                "input": self.config.cast_config_input,
                "weight": self.config.cast_config_weight,
                "grad": self.config.cast_config_grad_output,
            }[role]
            quantized, saturated = self._fp8(x, cast)
            zero = quantized.float() == 0
        else:
            from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

            quantized, scale = quantize_int8_rowwise(x)
            zero = quantized == 0
            saturated = (x.float() / scale.float().clamp_min(1e-12).view(-1, 1)).abs() > 127.5
        count = nonzero.sum().clamp_min(1)
        underflow = (zero & nonzero).sum() / count
        return x.abs().amax().float(), underflow.float(), saturated.float().mean()


class LowBitWatch:
    """The hooks of one sampled step on the converted layers, and what they measured.

    Args:
        kind: ``"fp8"`` or ``"int8"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._handles: list[Any] = []
        self._forward: dict[str, list[Tensor]] = {}  # fqn -> [in amax, w amax, in uf, w uf, saturation, snr]
        self._grad: dict[str, list[Tensor]] = {}  # fqn -> [grad amax, grad underflow, finite]
        self.step = 0
        self._generation = 0  # which arming a tensor hook belongs to (a later backward through an old graph)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, layers: dict[str, nn.Module], step: int) -> None:
        """Observe each layer's next forward (and the backward through it) on this sampled step."""
        self.disarm()
        self._forward.clear()
        self._grad.clear()
        self.step = step
        self._generation += 1
        for fqn, module in layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(fqn, _Quantizer(self.kind, module))))

    def _forward_hook(self, fqn: str, quantize: _Quantizer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if fqn in self._forward or not args or not isinstance(output, Tensor):
                return  # measured once per step (the first micro-batch)
            x = args[0]
            with torch.no_grad():
                if quantize.kind == "fp8" and torch.is_autocast_enabled():
                    # what torchao's Float8Linear quantizes: it casts its input to CUDA autocast's dtype (its
                    # check); int8's layer quantizes the input as it arrives
                    x = x.to(torch.get_autocast_gpu_dtype())
                x2 = x.reshape(-1, x.shape[-1])
                weight = module.weight.detach().to(x2.dtype)
                bias = module.bias.detach().to(x2.dtype) if module.bias is not None else None
                in_amax, in_uf, in_sat = quantize(x2, "input")
                w_amax, w_uf, w_sat = quantize(weight, "weight")
                reference = F.linear(x2.to(torch.bfloat16), weight.to(torch.bfloat16), _bf16(bias))
                snr = gemm_snr_db(output, reference)
                finite = torch.isfinite(x2).all() & torch.isfinite(output).all()
                sat = torch.maximum(in_sat, w_sat)
                self._forward[fqn] = [in_amax, w_amax, in_uf, w_uf, sat, snr, finite.float()]
            if output.requires_grad:
                output.register_hook(self._grad_hook(fqn, quantize, self._generation))

        return hook

    def _grad_hook(self, fqn: str, quantize: _Quantizer, generation: int) -> Any:
        def hook(grad: Tensor) -> None:
            if generation == self._generation and self.armed and fqn not in self._grad:
                amax, underflow, _ = quantize(grad.reshape(-1, grad.shape[-1]), "grad")
                self._grad[fqn] = [amax, underflow, torch.isfinite(grad).all().float()]

        return hook

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def collect(self) -> dict[str, LayerSample]:
        """Remove the hooks and read what this step measured (one host read)."""
        self.disarm()
        names = list(self._forward)
        if not names:
            return {}
        values = torch.stack([torch.stack(self._forward[n]) for n in names]).tolist()
        grad_names = list(self._grad)
        grad_values = torch.stack([torch.stack(self._grad[n]) for n in grad_names]).tolist() if grad_names else []
        grads = dict(zip(grad_names, grad_values))
        samples = {}
        for name, (in_amax, w_amax, in_uf, w_uf, saturation, snr, finite) in zip(names, values):
            grad_amax, grad_uf, grad_finite = grads.get(name, (None, None, 1.0))
            ok = bool(finite) and bool(grad_finite) and math.isfinite(snr)
            samples[name] = LayerSample(
                self.step, in_amax, w_amax, in_uf, w_uf, saturation, snr, grad_amax, grad_uf, finite=ok
            )
        self._forward.clear()
        self._grad.clear()
        return samples


def _bf16(t: Tensor | None) -> Tensor | None:
    return t.to(torch.bfloat16) if t is not None else None
