"""Per-module headroom and underflow statistics, sampled on chosen steps.

*Headroom* is how many doublings the largest value a module produced (an activation, or a gradient as the
low-precision backward saw it, loss scale included) can take before the format overflows. *Underflow* is the
fraction of a module's parameter-gradient elements that are non-zero in fp32 but below the format's smallest
normal once scaled: a proxy for gradient lost to underflow. Hooks exist only on sampled steps, values stay on
the device and are read once per sample, memory is O(number of modules).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp._compat import tensor_version
from lightning_mp._grads import all_reduce, local
from lightning_mp.diagnosis.attribution import floating
from lightning_mp.diagnosis.hooks import HookSet

__all__ = ["LEVELS", "Cadence", "ModuleStat", "ModuleStatistics", "Sampler", "headroom_bits", "underflow_fraction"]


def headroom_bits(amax: float, dtype: torch.dtype) -> float:
    """How many doublings ``amax`` can take before it overflows ``dtype``: ``log2(max(dtype) / amax)``.

    Negative means it already overflows; ``inf`` for an all-zero tensor.
    """
    if amax != amax or amax == math.inf:  # NaN or inf: it already overflowed
        return float("-inf")
    if amax == 0:
        return float("inf")
    return math.log2(torch.finfo(dtype).max / amax)


def underflow_fraction(values: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Fraction of elements that are non-zero in fp32 but zero or subnormal once scaled into ``dtype``.

    A proxy for the gradient lost to underflow: it counts ``0 < |x * scale| < smallest normal of dtype``,
    i.e. elements that the low-precision format can only hold with reduced precision, or not at all. The
    result is a 0-d tensor (no host sync).
    """
    if values.numel() == 0:
        return torch.zeros((), device=values.device)
    return underflow_count(values, dtype, scale) / values.numel()


def underflow_count(values: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """How many elements ``underflow_fraction`` counts, as a 0-d tensor.

    Clamping ``|x|`` at the threshold leaves the non-zero elements non-zero and puts every element at or above
    it exactly on it, so (non-zero) - (on the threshold) is the count: two counts and one temporary, half
    the time of comparing twice on a CPU.
    """
    threshold = torch.finfo(dtype).tiny / scale
    clamped = values.detach().abs().float().clamp_(max=threshold)
    return torch.count_nonzero(clamped) - torch.count_nonzero(clamped.eq_(threshold))


@dataclass
class ModuleStat:
    """Running per-module figures over the sampled steps (host floats).

    Each value is judged against the format it was computed in: a Hugging Face model's output holds fp16 logits
    and an fp32 loss, and the loss's gradient (the loss scale itself, 65536) is no risk to fp16's range. So
    the largest value is also kept per dtype, and the headroom reported is the lowest over those dtypes.
    """

    activation_amax: float = 0.0
    grad_amax: float | None = None  # as the low-precision backward saw it, loss scale included; None: not measured
    underflow_fraction: float | None = None  # of its parameter gradients at the last sample; fp16 only
    samples: int = 0
    activation_by_dtype: dict[torch.dtype, float] = field(default_factory=dict)
    grad_by_dtype: dict[torch.dtype, float] = field(default_factory=dict)

    def summary(self, dtype: torch.dtype) -> dict[str, float]:
        act_amax, act_bits = _judged(self.activation_by_dtype, self.activation_amax, dtype)
        grad_amax, grad_bits = (
            _judged(self.grad_by_dtype, self.grad_amax, dtype) if self.grad_amax is not None else (None, None)
        )
        return {
            "activation_amax": act_amax,
            "activation_headroom_bits": act_bits,
            "grad_amax": grad_amax,
            "grad_headroom_bits": grad_bits,
            "underflow_fraction": self.underflow_fraction,
            "samples": self.samples,
        }


def _judged(by_dtype: dict[torch.dtype, float], amax: float, dtype: torch.dtype) -> tuple[float, float]:
    """(amax, headroom) of the value closest to overflowing its own format; ``amax`` against ``dtype`` when
    nothing was kept per dtype."""
    if not by_dtype:
        return amax, headroom_bits(amax, dtype)
    return min(((a, headroom_bits(a, d)) for d, a in by_dtype.items()), key=lambda pair: pair[1])


LEVELS = ("off", "cheap", "full")


class Cadence:
    """Which optimizer steps are sampled: one in ``stats_every``, or one in the format's own default (25 in
    fp16, whose predictive scaler reads every sample; 100 in bf16 and fp32, fp32's range, where a sample only
    watches for values running away) and then the first step too, so that a short run's report has figures.
    A scaler calibrating its first scale asks for every step until it has.

    Args:
        stats_every: the user's cadence, or ``None`` for the format's default.
    """

    def __init__(self, stats_every: int | None = None) -> None:
        self.stats_every = stats_every

    def every(self, default: int) -> int:
        """The cadence in force, given the format's default."""
        return self.stats_every or default

    def due(self, step: int, default: int, samples_taken: int) -> bool:
        """Whether ``step`` is sampled by the cadence (a calibrating scaler asks for more: see ``Sampler.arm``)."""
        first = step == 1 and self.stats_every is None and not samples_taken
        return step % (self.stats_every or default) == 0 or first


class Sampler:
    """The statistics of a run on its cadence: armed when a sampled step's first micro-batch begins, folded in
    after its backward (and unscaling). What the loss scaler reads of a sample (the largest gradient inside the
    backward) is agreed across ranks: activation gradients are each rank's own, and ranks must pick one scale.

    Args:
        level: ``"off"``, ``"cheap"`` or ``"full"`` (see ``ModuleStatistics``).
        stats_every: the user's cadence, or ``None`` for the format's default.
    """

    def __init__(self, level: str = "cheap", stats_every: int | None = None) -> None:
        self.statistics = ModuleStatistics(level)
        self.cadence = Cadence(stats_every)

    def arm(self, model: nn.Module, step: int, default_every: int, stepper: Any) -> bool:
        """At a micro-batch's start: arm the hooks if this step is sampled (``stepper.calibrating``: every step
        until the scaler has its first scale; ``stepper.wants_backward_amax()``: record output gradients too).
        The stepper is asked only when the cadence does not decide: this runs on every micro-batch. Returns
        whether the step is sampled (at any statistics level: the low-bit layers' watch follows the cadence)."""
        if self.cadence.due(step, default_every, self.statistics.samples_taken) or stepper.calibrating:
            self.statistics.start(model, output_grads=stepper.wants_backward_amax())
            return True
        return False

    def collect(
        self, model: nn.Module, scale: float, dtype: torch.dtype, grad_of: Callable[[Tensor], Any] | None = None
    ) -> float | None:
        """Fold a sampled step in; the largest gradient measured inside its backward (agreed across ranks), or
        ``None`` on a step that was not sampled or did not measure it."""
        if not self.statistics.active:
            return None
        self.statistics.collect(model, scale, dtype, grad_of)
        value = self.statistics.backward_amax
        if value is None:
            return None
        (value,) = all_reduce([math.inf if math.isnan(value) else value], "MAX")
        return value


# What one measured value is: a module output's amax (ACTIVATION); the amax of the gradient flowing into a module
# output, loss scale included (OUTPUT_GRAD); the amax of a module's own parameter gradients, read after unscaling
# (PARAM_GRAD); the underflow fraction of those gradients at the loss scale (UNDERFLOW). Plain strings: each
# value of a sample is hashed several times, and an Enum member hashes in Python.
ACTIVATION, OUTPUT_GRAD, PARAM_GRAD, UNDERFLOW = "activation", "output_grad", "param_grad", "underflow"


class ModuleStatistics:
    """Per-module headroom and underflow, sampled on chosen steps. Memory O(number of modules).

    Levels: ``"cheap"`` records each module's output amax (forward hooks) and, after backward, the amax and
    underflow fraction of its own parameter gradients; ``"full"`` also records the amax of the gradient
    flowing into each module's output (a tensor hook), which is what overflows first in an fp16 backward.
    Hooks exist only during a sampled step; values stay on the device until ``collect`` reads them once.

    A sampled step costs one ``aminmax`` per tensor seen (no temporary, no per-tensor reduction to a scalar:
    the extremes are stacked and combined once in ``collect``) and, in fp16 only, an underflow count per
    parameter gradient. bf16 and fp32 share fp32's smallest normal, so their underflow is not measured
    (``underflow_fraction`` is ``None``): it was most of the cost of a sample, for a figure that is always 0.
    They share fp32's largest value too, and parameter gradients are fp32: their headroom there is fp32's own,
    so at the ``"cheap"`` level bf16 and fp32 samples measure activations only (``grad_amax`` is ``None``),
    which halves a sample's cost on a transformer; ``"full"`` still records the gradients into module outputs.
    """

    def __init__(self, level: str = "cheap") -> None:
        if level not in LEVELS:
            raise ValueError(f"statistics level {level!r} is invalid: must be one of {LEVELS}.")
        self.level = level
        self.modules: dict[str, ModuleStat] = {}  # fqn -> running figures
        self.samples_taken = 0  # sampled steps folded in so far
        self._hooks = HookSet(dispatch=True)  # armed and disarmed on every sample: one global hook
        # One per tensor measured this step: what it measures and its (min, max), 0-d tensors on the device.
        self._pending: list[tuple[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]] = []
        # The last output measured (a weak reference and its version counter) and its extremes: a container
        # that returns it unchanged is not measured twice. Weak: it must not keep the logits alive through the
        # backward.
        self._last: tuple[weakref.ref, int | None] | None = None
        self._last_extremes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._full = False  # this step also records the gradients flowing into module outputs
        self._make_hook = self._hook_for  # one bound method: the hook set keeps its table while it is the same
        # The largest gradient that flowed into any module output on the last sampled step, as measured (it
        # carries the loss scale); None when output gradients were not recorded.
        self.backward_amax: float | None = None

    @property
    def active(self) -> bool:
        return self._hooks.active

    def start(self, model: nn.Module, output_grads: bool = False) -> None:
        """Arm the hooks for one step. ``output_grads`` records the gradients flowing into module outputs at
        the ``"cheap"`` level too (the predictive loss scaler asks for them in fp16; see ``backward_amax``)."""
        if self.level == "off" or self.active:
            return
        self._full = self.level == "full" or output_grads
        self._hooks.register(model, self._make_hook, "forward")  # the same make_hook: its table is kept

    def _hook_for(self, fqn: str):
        key = (ACTIVATION, fqn)
        grad_key = (OUTPUT_GRAD, fqn)

        def forward_hook(module, args, output):
            for tensor in floating(output):
                last = self._last
                if (
                    last is not None
                    and last[0]() is tensor
                    and last[1] is not None
                    and last[1] == tensor_version(tensor)
                ):
                    # A container returning its last submodule's output, unwritten since: measured already.
                    self._pending.append((key, self._last_extremes))
                else:
                    extremes = self._measure(key, tensor.detach())
                    if extremes is not None:
                        self._last, self._last_extremes = (weakref.ref(tensor), tensor_version(tensor)), extremes
                if self._full and tensor.requires_grad and torch.is_grad_enabled():
                    tensor.register_hook(partial(self._extremes, grad_key))

        return forward_hook

    def _measure(self, key: tuple[str, str], tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Measure ``tensor``'s (min, max) for ``key``; returns them, or ``None`` for an empty tensor."""
        tensor = local(tensor)
        if not tensor.numel():
            return None
        extremes = torch.aminmax(tensor)
        self._pending.append((key, extremes))
        return extremes

    def _extremes(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        """``_measure`` as a tensor hook on a gradient: it must return nothing, or it would replace the gradient."""
        self._measure(key, tensor)

    def discard(self) -> None:
        """Drop the values measured so far this step and keep the hooks armed (the step runs again)."""
        self._pending, self._last, self._last_extremes = [], None, None

    def stop(self) -> None:
        """Remove the hooks and drop this step's values without folding them in."""
        self._hooks.remove()
        self.discard()

    def collect(
        self, model: nn.Module, scale: float, dtype: torch.dtype, grad_of: Callable[[Tensor], Any] | None = None
    ) -> None:
        """After backward (before the optimizer step): fold this step's values into the running stats.

        Args:
            model: the model the hooks were armed on; its parameter gradients must be unscaled already.
            scale: the loss scale the backward ran with (1.0 without a scaler).
            dtype: the low-precision dtype headroom and underflow are judged against.
            grad_of: where a parameter's gradient is (``p.grad`` when ``None``; an fp32 master's when the model's
                gradients moved there: ``weights.RunWeights.grad_of``).
        """
        grad_of = grad_of or (lambda p: p.grad)
        if not self.active:
            return
        self._hooks.remove()
        self.backward_amax = None
        measure_underflow = torch.finfo(dtype).tiny > torch.finfo(torch.float32).tiny
        measure_range = _max_exponent(dtype) < _max_exponent(torch.float32)  # fp16, not bf16 or fp32
        under_keys, under = [], []
        for fqn, module in model.named_modules() if measure_range or measure_underflow else ():
            grads = [local(g) for p in module.parameters(recurse=False) if (g := grad_of(p)) is not None]
            if not fqn or not grads:
                continue
            if measure_range:
                for grad in grads:
                    self._measure((PARAM_GRAD, fqn), grad)
            if measure_underflow:
                numel = sum(g.numel() for g in grads)
                under_keys.append((UNDERFLOW, fqn))
                under.append(sum(underflow_count(g, dtype, scale) for g in grads) / max(numel, 1))
        pending = self._pending
        self.discard()
        if not pending and not under:
            return
        device = (pending[0][1][0] if pending else under[0]).device
        # amax = max(high, -low), one vector op per dtype: stacking 0-d tensors of mixed dtypes (a bf16 model's
        # fp32 norms) takes a slow path, 5x the cost of one stack per dtype.
        by_dtype: dict[torch.dtype, tuple[list[tuple[str, str]], list[torch.Tensor]]] = {}
        for key, (low, high) in pending:
            group_keys, extremes = by_dtype.setdefault(low.dtype, ([], []))
            group_keys.append(key)
            extremes += (low, high)
        keys, dtypes, parts = [], [], []
        for value_dtype, (group_keys, extremes) in by_dtype.items():
            keys += group_keys
            dtypes += [value_dtype] * len(group_keys)
            pairs = _stack(extremes, device).float().view(-1, 2)
            parts.append(torch.maximum(pairs[:, 1], -pairs[:, 0]))
        keys += under_keys
        if under:
            parts.append(_stack(under, device).float())
        dtypes += [dtype] * len(under_keys)
        values = torch.cat(parts).tolist()  # the one read of this sample
        folded: dict[tuple[str, str, torch.dtype], float] = {}
        for (what, fqn), value_dtype, value in zip(keys, dtypes, values):
            key = (what, fqn, value_dtype)
            folded[key] = _nan_max(folded[key], value) if key in folded else value
        # What the loss scale can push over fp16's edge: gradients computed in the low-precision format only (an
        # fp32 loss's gradient is the scale itself).
        grad_values = [v for (what, _, d), v in folded.items() if what == OUTPUT_GRAD and d == dtype]
        self.backward_amax = max(grad_values, key=_nan_key) if grad_values else None
        # A module's parameter gradients are fp32 tensors; they were computed in the format its outputs were.
        computed_in = {}
        for what, fqn, value_dtype in folded:
            if what == ACTIVATION and (
                fqn not in computed_in or _max_exponent(value_dtype) < _max_exponent(computed_in[fqn])
            ):
                computed_in[fqn] = value_dtype
        touched = set()
        for (what, fqn, value_dtype), value in folded.items():
            stat = self.modules.get(fqn)
            if stat is None:
                stat = self.modules[fqn] = ModuleStat()
            touched.add(fqn)
            if what == ACTIVATION:
                stat.activation_amax = _nan_max(stat.activation_amax, value)
                _fold(stat.activation_by_dtype, value_dtype, value)
            elif what == OUTPUT_GRAD:  # captured during backward: already carries the loss scale
                stat.grad_amax = _nan_max(stat.grad_amax, value)
                _fold(stat.grad_by_dtype, value_dtype, value)
            elif what == PARAM_GRAD:  # read after unscale_: put the scale back to compare with the format
                stat.grad_amax = _nan_max(stat.grad_amax, value * scale)
                _fold(stat.grad_by_dtype, computed_in.get(fqn, dtype), value * scale)
            else:
                stat.underflow_fraction = value
        for fqn in touched:
            self.modules[fqn].samples += 1
        self.samples_taken += 1

    def summary(self, dtype: torch.dtype) -> dict[str, dict[str, float]]:
        return {fqn: stat.summary(dtype) for fqn, stat in self.modules.items()}


def _fold(by_dtype: dict[torch.dtype, float], dtype: torch.dtype, value: float) -> None:
    by_dtype[dtype] = _nan_max(by_dtype.get(dtype), value)


def _max_exponent(dtype: torch.dtype) -> int:
    """The largest power of two a format holds: 15 for fp16, 127 for bf16 and fp32 (bf16's largest value is a
    little below fp32's, with the same exponent)."""
    return math.floor(math.log2(torch.finfo(dtype).max))


def _stack(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors on ``device``; moving each one is only needed when the model spans devices."""
    try:
        return torch.stack(values).to(device)
    except RuntimeError:  # "Expected all tensors to be on the same device"
        return torch.stack([t.to(device) for t in values])


def _nan_key(value: float) -> float:
    """Sort key that ranks NaN above everything, as an overflow."""
    return math.inf if math.isnan(value) else value


def _nan_max(a: float | None, b: float) -> float:
    """``max`` that keeps a NaN (Python's ``max`` drops it or not depending on the order); ``a`` is ``None``
    before the first value."""
    if a is None:
        return b
    return a + b if a != a or b != b else max(a, b)
