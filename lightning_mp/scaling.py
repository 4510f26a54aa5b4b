"""Adaptive loss scaling for fp16 mixed precision.

Why scale at all
----------------
fp16 has 5 exponent bits: its largest finite value is 65504 and anything smaller than about 6e-8 rounds to
zero. Gradients of activations are usually tiny, so in an fp16 backward pass many of them underflow and are
lost. Loss scaling (Micikevicius et al., 2018) multiplies the loss by a scale ``S`` before ``backward``;
every gradient in the backward graph is then ``S`` times larger and clears the underflow line. Before the
optimizer sees them, the fp32 parameter gradients are divided by ``S`` again ("unscaled"). The price: with
``S`` too large, some intermediate gradient exceeds 65504, becomes ``inf``, the step has to be skipped and
``S`` lowered.

What ``torch.amp.GradScaler`` does (``policy="dynamic"`` here)
-------------------------------------------------------------
Halve ``S`` on every step with an inf/NaN gradient (skipping that step) and double it after
``growth_interval`` clean steps in a row. At equilibrium it therefore re-tries a scale it already knows to
be too large once every ``growth_interval`` steps and pays a skipped step each time; a single spiky batch
halves the scale; nothing stops the scale from decaying to zero. ``policy="dynamic"`` keeps that rule and
adds three guards: ``hysteresis`` (tolerate isolated overflows), ``min_scale`` / ``max_scale`` and a
defined action at the floor. With ``hysteresis=1, min_scale=None, max_scale=None`` it reproduces
GradScaler's scale trajectory exactly (same float32 rounding, same growth tracker).

What ``policy="predictive"`` adds
---------------------------------
In the same pass that checks the gradients for inf/NaN we also take their largest magnitude (``amax``), and
read it on the one host synchronisation that ``GradScaler.step`` already does. With it the policy keeps:

* a short history of the *unscaled* gradient amax ``a`` of recent clean steps;
* the *overflow product* ``P``: the smallest value of ``S * a`` known to overflow. It starts at the format's
  largest value (a clean fp16 step can not hold a scaled gradient above 65504) and is lowered to
  ``S * max(history)`` whenever an overflow is confirmed. ``P`` captures what we can not see directly, the
  ratio between the largest *activation* gradient inside the backward pass and the largest parameter
  gradient.

Growth then asks "would ``S * g * a`` stay at least ``headroom_bits`` below ``P``?" instead of doubling
blindly, and jumps by as many factors of ``g`` as that headroom allows (faster recovery, less underflow).
A scale that is refused growth stays put, so the periodic failed probe of GradScaler disappears; after
``probe_after`` refused growth checks ``P`` is relaxed by one factor so a stale ``P`` can not pin the scale
low forever (one probe every ``probe_after + 1`` growth intervals instead of every interval). When the
recent amax rises so that ``S * a`` comes within ``shrink_headroom_bits`` of ``P``, the scale is lowered
*before* the overflow happens. While ``P`` is still the format's limit (a loose guess) each growth covers
half the remaining distance to it; once an overflow has measured ``P`` growth goes straight to the
largest scale it allows. A growth that overflows while still on probation (fewer than ``amax_history``
clean steps at the new scale) is reverted to the scale that worked, in one step, instead of being halved
one skipped step at a time.

Hysteresis counting rule
------------------------
An overflow is *tolerated* (the step is skipped, the scale kept) unless it is the ``hysteresis``-th overflow
within the last ``hysteresis_window`` optimizer steps, or the current scale has not proven itself yet (one
clean step; for a predictive growth, its probation). We count within a window rather than consecutively
because a scale that is slightly too large overflows on *some* batches, e.g. every other step: a consecutive
counter is reset by each clean step in between and would never back off, skipping half the steps forever.
The "not proven" exception keeps the start-up descent (and a failed growth probe) as fast as GradScaler's.

The floor
---------
The scale never goes below ``min_scale`` (or, with ``min_scale=None``, below the smallest normal float32),
so it never becomes zero, subnormal or non-finite. Overflows that keep coming at the floor mean the
gradients are non-finite at any scale, which is not a scaling problem. After ``floor_patience`` confirmed
overflows at the floor without a clean step in between the scaler calls ``on_floor(scaler)`` if one was
given (the :class:`~lightning_mp.AdaptiveMP` plugin uses this hook to escalate), otherwise it raises
:class:`LossScaleFloorError` with advice.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

from lightning_mp._grads import all_reduce, amax, group_by_device_and_dtype, is_sharded, local

__all__ = ["AdaptiveLossScaler", "LossScaleFloorError", "ScalePolicy", "ScalerConfig"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32, 2**-126
_F32_MAX = float(torch.finfo(torch.float32).max)
_MAX_JUMP = 16  # most factors of growth_factor one predictive growth may take at once
_POLICIES = ("dynamic", "predictive")


class LossScaleFloorError(RuntimeError):
    """Raised when the loss scale sits at its floor and the gradients still overflow."""


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32, as GradScaler's float32 ``_scale`` tensor does."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: float32 arithmetic gives inf
        return math.copysign(math.inf, value)


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"AdaptiveLossScaler({field}={value!r}) is invalid: {field} must be {allowed}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ScalerConfig:
    """Every knob of the update rule, validated once at construction. See the module docstring."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000  # lower = faster recovery after a back-off, more probing overflows
    policy: Literal["dynamic", "predictive"] = "predictive"
    hysteresis: int = 2  # overflows within hysteresis_window needed to back off; 1 = back off on every one
    # Optimizer steps; None = growth_interval, so overflows that recur within one growth interval (even
    # regular spikes) back off, while rarer ones cost their one skipped step each and no back-off.
    hysteresis_window: int | None = None
    min_scale: float | None = 1.0  # None = smallest normal float32 (never 0 or subnormal)
    max_scale: float | None = 2.0**24  # None = unbounded (growth still never reaches inf)
    amax_history: int = 16  # clean steps of gradient amax the predictive policy remembers
    # Growth must leave S*amax this many bits below the overflow product. Lower = the scale follows shrinking
    # gradients sooner (less underflow), at the price of an occasional failed growth on a noisy amax.
    headroom_bits: float = 0.25
    shrink_headroom_bits: float = 0.0625  # shrink ahead when S*amax comes this close to the overflow product
    probe_after: int = 32  # refused growth checks before the learned overflow product is relaxed
    floor_patience: int = 8  # confirmed overflows at the floor before on_floor / LossScaleFloorError
    format_max: float = FP16_MAX  # largest finite value of the low-precision format

    def __post_init__(self) -> None:
        for name in ("init_scale", "growth_factor", "backoff_factor", "format_max"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise _invalid(name, value, "a finite number")
        if self.init_scale <= 0:
            raise _invalid("init_scale", self.init_scale, "> 0")
        if self.growth_factor <= 1:
            raise _invalid("growth_factor", self.growth_factor, "> 1")
        if not 0 < self.backoff_factor < 1:
            raise _invalid("backoff_factor", self.backoff_factor, "in the open interval (0, 1)")
        if self.policy not in _POLICIES:
            raise _invalid("policy", self.policy, f"one of {_POLICIES}")
        for name in ("growth_interval", "hysteresis", "amax_history", "probe_after", "floor_patience"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _invalid(name, value, "an integer >= 1")
        window = self.hysteresis_window
        if window is not None and (not _is_int(window) or window < 1):
            raise _invalid("hysteresis_window", window, "None or an integer >= 1")
        for name in ("min_scale", "max_scale"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise _invalid(name, value, "None or a finite number > 0")
        if self.min_scale is not None and self.max_scale is not None and self.min_scale > self.max_scale:
            raise ValueError(
                f"AdaptiveLossScaler(min_scale={self.min_scale!r}, max_scale={self.max_scale!r}) is invalid:"
                " min_scale must be <= max_scale."
            )
        for name in ("headroom_bits", "shrink_headroom_bits"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise _invalid(name, value, "a finite number >= 0")
        if self.shrink_headroom_bits >= self.headroom_bits:
            raise ValueError(
                f"AdaptiveLossScaler(shrink_headroom_bits={self.shrink_headroom_bits!r},"
                f" headroom_bits={self.headroom_bits!r}) is invalid: shrink_headroom_bits must be"
                " < headroom_bits, or the scale would shrink right after every growth."
            )

    @property
    def floor(self) -> float:
        return self.min_scale if self.min_scale is not None else _F32_TINY

    @property
    def window(self) -> int:
        return self.hysteresis_window if self.hysteresis_window is not None else self.growth_interval

    def clamp(self, scale: float) -> float:
        if self.max_scale is not None:
            scale = min(scale, self.max_scale)
        return max(scale, self.floor)


class ScalePolicy:
    """The pure update rule: host floats in, a new scale out. No tensors, no device, no Lightning.

    Drive it by hand with ``update(found_inf, amax)`` once per optimizer step; :class:`AdaptiveLossScaler`
    does exactly that after reading both values on GradScaler's existing host synchronisation.
    """

    def __init__(self, config: ScalerConfig) -> None:
        self.config = config
        self.scale = _f32(config.clamp(config.init_scale))
        self.growth_tracker = 0  # clean steps since the last growth check or overflow (GradScaler's tracker)
        self.steps = 0  # update() calls
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients (counted by the scaler)
        self.overflows = 0  # update() calls that saw an overflow
        self.backoffs = 0
        self.growths = 0
        self.preemptive_backoffs = 0
        self.floor_hits = 0  # confirmed overflows at the floor since the last clean step
        self.overflow_product = config.format_max
        self._recent_overflows: deque[int] = deque()
        self._amax: deque[float] = deque(maxlen=config.amax_history)
        self._clean_steps_at_scale = 0
        self._scale_before_growth: float | None = None  # set while the current scale came from a growth
        self._refused_growths = 0

    @property
    def predictive(self) -> bool:
        return self.config.policy == "predictive"

    def set_scale(self, scale: float) -> None:
        """Force a scale (``GradScaler.update(new_scale)``); it still respects the floor and ceiling."""
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"new_scale={scale!r} is invalid: the loss scale must be a finite number > 0.")
        self._set(_f32(self.config.clamp(float(scale))))

    def update(self, found_inf: bool, amax: float | None = None, scale_related: bool = True) -> str:
        """Advance one optimizer step and return what was done.

        Args:
            found_inf: whether any gradient of this step was inf or NaN (the step was skipped).
            amax: largest absolute *unscaled* gradient of the step; ``None`` when not measured.
            scale_related: ``False`` when the non-finite value did not come from scaling (a bad batch, a
                forward overflow, a NaN loss): lowering the scale cannot fix it, so the scale and the
                growth tracker are left alone.

        Returns:
            One of ``"held"``, ``"grew"``, ``"growth_refused"``, ``"shrank_ahead"``, ``"tolerated"``
            (overflow absorbed by hysteresis), ``"backed_off"``, ``"reverted"`` (a failed growth undone) and
            ``"floor"`` (the floor action is due), ``"excused"`` (not scale related).
        """
        self.steps += 1
        if found_inf and not scale_related:
            self.overflows += 1
            return "excused"
        if found_inf:
            return self._on_overflow()
        return self._on_clean(amax)

    def _on_overflow(self) -> str:
        config = self.config
        self.overflows += 1
        # GradScaler resets its tracker on every overflow: growth needs growth_interval clean steps in a row.
        self.growth_tracker = 0
        self._recent_overflows.append(self.steps)
        while self._recent_overflows[0] <= self.steps - config.window:
            self._recent_overflows.popleft()
        # A predictive growth stays on probation for amax_history clean steps: an overflow in that time says
        # the growth was wrong, not that this batch was unlucky. Any other scale is proven by one clean step.
        probation = config.amax_history if self.predictive and self._scale_before_growth is not None else 1
        proven = self._clean_steps_at_scale >= probation
        if proven and len(self._recent_overflows) < config.hysteresis:
            return "tolerated"
        self._recent_overflows.clear()

        at_floor = self.scale <= config.floor
        before_growth = self._scale_before_growth
        a_ref = max(self._amax) if self._amax else None
        if self.predictive and a_ref is not None:
            # The product that overflowed is at least S * (largest recent amax); remember the lowest one.
            self.overflow_product = min(self.overflow_product, self.scale * a_ref)
        if self.predictive and not proven and before_growth is not None:
            new_scale, action = before_growth, "reverted"  # undo the failed growth in one step
        else:
            new_scale, action = _f32(self.scale * config.backoff_factor), "backed_off"
        self._refused_growths = 0
        self._set(max(new_scale, config.floor))
        self.backoffs += 1
        if at_floor:
            self.floor_hits += 1
            if self.floor_hits >= config.floor_patience:
                return "floor"
        return action

    def _set(self, scale: float, grown: bool = False) -> None:
        """Move to a new scale; a grown scale remembers where it came from (for a revert)."""
        self._scale_before_growth = self.scale if grown else None
        self.scale = scale
        self._clean_steps_at_scale = 0

    def _on_clean(self, amax: float | None) -> str:
        config = self.config
        self.floor_hits = 0
        self._clean_steps_at_scale += 1
        self.growth_tracker += 1
        if self.predictive and amax is not None and math.isfinite(amax):
            self._amax.append(float(amax))
            if self._shrink_ahead():
                return "shrank_ahead"
        if self.growth_tracker < config.growth_interval:
            return "held"
        self.growth_tracker = 0
        return self._grow()

    def _shrink_ahead(self) -> bool:
        # A single spiky batch that stayed finite is no reason to shrink: look at the smallest of the last few.
        recent = list(self._amax)[-3:]
        a_now = min(recent)
        if a_now <= 0:
            return False
        product = self.scale * a_now
        if product >= self.overflow_product:
            # Clean at a product we believed would overflow: the learned ceiling is stale (the activation to
            # parameter gradient ratio has shrunk). Raise it rather than shrink on stale evidence.
            self.overflow_product = product * self.config.growth_factor
            return False
        if len(recent) < 3 or math.log2(self.overflow_product / product) >= self.config.shrink_headroom_bits:
            return False
        new_scale = max(_f32(self.scale * self.config.backoff_factor), self.config.floor)
        if new_scale >= self.scale:
            return False
        self._set(new_scale)
        self.growth_tracker = 0
        self.preemptive_backoffs += 1
        self._amax.clear()  # amax measured at the old scale says nothing new about the lower one
        return True

    def _grow(self) -> str:
        config = self.config
        factor = config.growth_factor
        if self.predictive and self._amax and max(self._amax) > 0:
            room = self.overflow_product / (self.scale * max(self._amax) * 2.0**config.headroom_bits)
            allowed = math.floor(math.log(room, config.growth_factor)) if room > 0 else 0
            # Until an overflow has measured P it is only the format's limit, a loose guess: cover half the
            # distance per growth (one failed probe at most). A measured P is trusted all the way.
            measured = self.overflow_product < config.format_max
            steps = allowed if measured or allowed < 2 else allowed // 2
            if steps < 1:
                self._refused_growths += 1
                if self._refused_growths >= config.probe_after:
                    # P may be stale (the model changed): forget one factor so the next check may probe,
                    # but never past the format's own limit (a clean step can not exceed it).
                    relaxed = self.overflow_product * config.growth_factor
                    self.overflow_product = min(relaxed, max(self.overflow_product, config.format_max))
                    self._refused_growths = 0
                return "growth_refused"
            factor = config.growth_factor ** min(steps, _MAX_JUMP)
        new_scale = _f32(self.scale * factor)
        if config.max_scale is not None:
            new_scale = min(new_scale, config.max_scale)
        # GradScaler keeps the old scale when growth would overflow float32 to inf; so do we.
        if not math.isfinite(new_scale) or new_scale <= self.scale:
            return "held"
        self._set(new_scale, grown=True)
        self.growths += 1
        return "grew"

    _COUNTERS = (
        "scale",
        "growth_tracker",
        "steps",
        "skipped_steps",
        "overflows",
        "backoffs",
        "growths",
        "preemptive_backoffs",
        "floor_hits",
        "overflow_product",
    )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in self._COUNTERS}
        state.update(
            recent_overflows=list(self._recent_overflows),
            amax_history=list(self._amax),
            clean_steps_at_scale=self._clean_steps_at_scale,
            scale_before_growth=self._scale_before_growth,
            refused_growths=self._refused_growths,
            config=asdict(self.config),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and learned state; the configuration in force stays the constructed one."""
        for name in self._COUNTERS:
            if name in state:
                setattr(self, name, type(getattr(self, name))(state[name]))
        self._recent_overflows = deque(state.get("recent_overflows", ()))
        self._amax = deque(state.get("amax_history", ()), maxlen=self.config.amax_history)
        self._clean_steps_at_scale = int(state.get("clean_steps_at_scale", 0))
        self._scale_before_growth = state.get("scale_before_growth")
        self._refused_growths = int(state.get("refused_growths", 0))


class AdaptiveLossScaler(torch.amp.GradScaler):
    """A :class:`torch.amp.GradScaler` with a better update rule, counters, and a defined floor.

    It is a drop-in GradScaler: ``scale``, ``unscale_``, ``step``, ``update``, ``get_scale``, ``state_dict``
    and ``load_state_dict`` behave as documented there, it works in a hand-written loop and inside Lightning's
    own ``MixedPrecision(scaler=...)``. Only the update rule differs (see the module docstring), and it adds
    no host-device synchronisation: found-inf flags and the gradient amax are read together on the one
    ``.item()`` GradScaler.step already does, and the scale lives on the host, so ``get_scale()`` and
    ``state_dict()`` need no sync at all. (Optimizers that unscale inside a fused kernel never sync in
    ``step``; for them ``update`` reads the flags once.)

    Args:
        device: device type the gradients live on (``"cuda"``, ``"cpu"``, ...), as for GradScaler.
        init_scale: the first scale.
        growth_factor: multiplier on growth, > 1.
        backoff_factor: multiplier on back-off, in (0, 1).
        growth_interval: clean steps in a row before growth is considered.
        enabled: ``False`` makes every method a no-op, as for GradScaler.
        policy: ``"predictive"`` (headroom-driven, default) or ``"dynamic"`` (GradScaler's reactive rule).
        on_floor: called with the scaler when the floor action is due; ``None`` raises
            :class:`LossScaleFloorError` instead. Not pickled.
        **knobs: the remaining fields of :class:`ScalerConfig` (``hysteresis``, ``min_scale``, ...).

    Raises:
        ValueError: for any out-of-range knob, naming it, its value and what is allowed.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        policy: Literal["dynamic", "predictive"] = "predictive",
        on_floor: Callable[[AdaptiveLossScaler], None] | None = None,
        **knobs: Any,
    ) -> None:
        unknown = sorted(set(knobs) - set(ScalerConfig.__dataclass_fields__))
        if unknown:
            allowed = sorted(set(ScalerConfig.__dataclass_fields__) - {"init_scale", "policy"})
            raise TypeError(f"AdaptiveLossScaler got unknown argument(s) {unknown}; allowed: {allowed}.")
        if not isinstance(device, str):
            raise _invalid("device", device, 'a device type string such as "cuda" or "cpu"')
        # Validate everything before GradScaler sees it (it only asserts two of these, and only when enabled).
        config = ScalerConfig(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            policy=policy,
            **knobs,
        )
        super().__init__(device, config.init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._policy = ScalePolicy(config)
        self._init_scale = self._policy.scale
        self.on_floor = on_floor
        # amax costs one extra reduction over the gradients; only pay for it when someone reads it.
        self.track_amax = config.policy == "predictive"
        self.last_amax: float | None = None  # unscaled gradient amax of the last step, when tracked
        self.last_action: str | None = None
        self._excused = False
        self._sharded = False  # this step's gradients are shards: flags must be combined across ranks
        # Set by whoever knows that each rank holds only a shard of plain-tensor gradients (FSDP1's flat
        # parameters; AdaptiveFSDPMP sets it). DTensor shards (FSDP2) are recognised without it.
        self.sharded_gradients = False

    # ----------------------------------------------------------------------------------------- public
    @property
    def config(self) -> ScalerConfig:
        return self._policy.config

    @property
    def policy(self) -> ScalePolicy:
        return self._policy

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because their gradients were not finite (each optimizer counts)."""
        return self._policy.skipped_steps

    @property
    def stats(self) -> dict[str, float]:
        """Counters a user may want to log: scale, skipped steps, overflows, back-offs, growths, ..."""
        state = self._policy.state_dict()
        return {name: state[name] for name in ScalePolicy._COUNTERS}

    def get_scale(self) -> float:
        # The scale lives on the host: no sync, unlike GradScaler.get_scale().
        return self._policy.scale if self._enabled else 1.0

    def _get_growth_tracker(self) -> int:
        return self._policy.growth_tracker if self._enabled else 0

    def set_growth_factor(self, new_factor: float) -> None:
        self._policy.config = replace(self.config, growth_factor=new_factor)
        super().set_growth_factor(new_factor)

    def set_backoff_factor(self, new_factor: float) -> None:
        self._policy.config = replace(self.config, backoff_factor=new_factor)
        super().set_backoff_factor(new_factor)

    def set_growth_interval(self, new_interval: int) -> None:
        self._policy.config = replace(self.config, growth_interval=new_interval)
        super().set_growth_interval(new_interval)

    # ------------------------------------------------------------------------------ GradScaler hooks
    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        self._scale = torch.full((), self._policy.scale, dtype=torch.float32, device=dev)
        self._growth_tracker = torch.full((), self._policy.growth_tracker, dtype=torch.int32, device=dev)

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        # Same work as GradScaler._unscale_grads_, plus (when tracked) the amax of the still-scaled gradients,
        # read before the unscale kernel runs so it is correct for both callers (unscale_ and the fused path).
        grads = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if not allow_fp16 and param.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if param.grad.is_sparse:
                        # Duplicate indices are summed by coalesce(); in fp16 that sum may overflow, so check it.
                        if param.grad.dtype is torch.float16:
                            param.grad = param.grad.coalesce()
                        grads.append(param.grad._values())
                    else:
                        grads.append(param.grad)
            if self.track_amax:
                scaled_amax = amax(grads, inv_scale.device)
                self._per_optimizer_states[id(optimizer)]["scaled_amax"] = scaled_amax
            self._sharded = self.sharded_gradients or is_sharded(grads)
            found_per_device = {}
            for device, by_dtype in group_by_device_and_dtype(grads).items():
                found_per_device[device] = found_inf.to(device, copy=True) if device != found_inf.device else found_inf
                for same in by_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        same, found_per_device[device], inv_scale.to(device)
                    )
        return found_per_device

    def _read_flags(self, optimizer_state: dict[str, Any]) -> tuple[bool, float | None]:
        """Read this optimizer's found-inf flags and scaled amax with a single host synchronisation."""
        assert self._scale is not None
        device = self._scale.device
        values = [flag.to(device) for flag in optimizer_state["found_inf_per_device"].values()]
        scaled_amax = optimizer_state.get("scaled_amax")
        if scaled_amax is not None:
            values.append(scaled_amax.to(device))
        stacked = torch.stack([local(v) for v in values])
        if self._sharded:
            all_reduce(stacked)  # each rank checked only its shard: agree before deciding anything
        host = stacked.tolist()
        found = any(v != 0 for v in (host[:-1] if scaled_amax is not None else host))
        amax_value = host[-1] / self._policy.scale if scaled_amax is not None else None
        optimizer_state["host"] = (found, amax_value)
        return found, amax_value

    def _maybe_opt_step(
        self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> float | None:
        # GradScaler syncs here to decide whether to step; we read the amax on the same sync.
        found, _ = self._read_flags(optimizer_state)
        if found:
            self._policy.skipped_steps += 1
            return None
        return optimizer.step(*args, **kwargs)

    def excuse_overflow(self) -> None:
        """Mark this iteration's overflow as not caused by the scale (call between ``step`` and ``update``).

        The step is still skipped and counted, but the scale is not lowered: a forward overflow or a NaN
        batch would otherwise drag the scale down for nothing.
        """
        self._excused = True

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Update the scale from this iteration's overflow flags (and amax); see GradScaler.update.

        Raises:
            LossScaleFloorError: the scale is at its floor, keeps overflowing, and no ``on_floor`` is set.
        """
        if not self._enabled:
            return
        self._check_scale_growth_tracker("update")
        assert self._scale is not None and self._growth_tracker is not None
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("new_scale must be a float or a 1-element tensor with requires_grad=False.")
                new_scale = float(new_scale.item())
            self._policy.set_scale(new_scale)
            action = "set"
        else:
            states = [s for s in self._per_optimizer_states.values() if s["found_inf_per_device"]]
            if not states:
                raise AssertionError("No inf checks were recorded prior to update.")
            found_any, amaxes = False, []
            for state in states:
                if "host" in state:
                    found, amax_value = state["host"]
                else:
                    # Fused optimizers unscale inside their kernel and never synced in step(): read once here.
                    found, amax_value = self._read_flags(state)
                    if found and state["stage"] is OptState.STEPPED:
                        self._policy.skipped_steps += 1
                found_any = found_any or found
                if amax_value is not None:
                    amaxes.append(amax_value)
            self.last_amax = max(amaxes) if amaxes and not found_any else None
            action = self._policy.update(found_any, self.last_amax, scale_related=not self._excused)
        self._excused = False
        # fill_ with a Python number is an asynchronous host-to-device write: no sync.
        self._scale.fill_(self._policy.scale)
        self._growth_tracker.fill_(self._policy.growth_tracker)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self.last_action = action
        if action == "floor":
            self._at_floor()

    def _at_floor(self) -> None:
        if self.on_floor is not None:
            self.on_floor(self)
            return
        raise LossScaleFloorError(
            f"The loss scale is at its floor ({self._policy.scale:g}) and the gradients still overflowed on"
            f" {self._policy.floor_hits} back-off(s) in a row (step {self._policy.steps}). Gradients that are"
            " not finite at any scale point at the forward pass or the loss, not at loss scaling. Try"
            " precision='bf16-mixed', running the overflowing modules in fp32"
            " (AdaptiveMP(fp32_modules=[...])), a lower learning rate or gradient clipping; or lower"
            " min_scale if the gradients are genuinely huge."
        )

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """GradScaler's five entries, plus ``"adaptive"``: the policy's counters and learned state."""
        if not self._enabled:
            return {}
        state = super().state_dict()
        state["adaptive"] = self._policy.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an AdaptiveLossScaler or a plain GradScaler state dict."""
        if not self._enabled:
            return
        super().load_state_dict(state_dict)
        config = replace(
            self.config,
            growth_factor=state_dict["growth_factor"],
            backoff_factor=state_dict["backoff_factor"],
            growth_interval=state_dict["growth_interval"],
        )
        self._policy.config = config
        self._policy.load_state_dict(state_dict.get("adaptive", {}))
        self._policy.scale = _f32(float(state_dict["scale"]))
        self._policy.growth_tracker = int(state_dict["_growth_tracker"])
        self._init_scale = self._policy.scale

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["on_floor"] = None  # a hook usually points at a live plugin or trainer; do not drag it along
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(policy={self.config.policy!r}, scale={self.get_scale():g},"
            f" skipped_steps={self.skipped_steps})"
        )
