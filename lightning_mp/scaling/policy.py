"""The loss scale's update rule as pure host arithmetic: :class:`ScalerConfig`, :class:`ScalePolicy` and the
:class:`ScaleAction` each update returns. No tensors, no device, no Lightning; the method is explained in the
docstring of :mod:`lightning_mp.scaling`.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Literal

from lightning_mp.errors import ConfigError

__all__ = ["FP16_MAX", "LossScaleFloorError", "ScaleAction", "ScalePolicy", "ScalerConfig"]

FP16_MAX = 65504.0  # largest finite float16
_F32_TINY = 2.0**-126  # smallest normal float32
_MAX_JUMP = 16  # most factors of growth_factor one predictive growth may take at once
_POLICIES = ("dynamic", "predictive")
# Growth headroom when headroom_bits is None: an overflow costs a skipped step, or, where the plugin rescues
# overflowing steps, one extra forward/backward; cheaper overflows earn a scale closer to the edge.
HEADROOM_BITS, RESCUED_HEADROOM_BITS = 0.25, 0.125
# A calibrated first scale leaves the largest gradient measured on the first clean step this many bits below
# the format's largest value: room for the batch-to-batch spread of gradient magnitudes in the first steps.
CALIBRATION_HEADROOM_BITS = 2.0


class LossScaleFloorError(RuntimeError):
    """Raised when the loss scale sits at its floor and the gradients still overflow."""


class ScaleAction(str, Enum):
    """What one :meth:`ScalePolicy.update` did. A ``str`` enum: ``action == "backed_off"`` still holds."""

    HELD = "held"
    GREW = "grew"
    GROWTH_REFUSED = "growth_refused"
    SHRANK_AHEAD = "shrank_ahead"  # lowered before an overflow, on a rising gradient amax
    TOLERATED = "tolerated"  # an overflow absorbed by hysteresis: step skipped, scale kept
    BACKED_OFF = "backed_off"
    REVERTED = "reverted"  # a failed growth undone in one step
    FLOOR = "floor"  # backed off at the floor often enough that the floor action is due
    EXCUSED = "excused"  # an overflow that did not come from the scale (bad batch, forward, loss)
    SET = "set"  # forced by GradScaler.update(new_scale)
    CALIBRATED = "calibrated"  # the first clean step of a fresh run set the scale from its measured amax

    @property
    def text(self) -> str:
        """How an overflow event shows this action; empty for actions not worth a word there."""
        return _ACTION_TEXT[self]


_ACTION_TEXT = {
    ScaleAction.HELD: "",
    ScaleAction.GREW: "scale grew",
    ScaleAction.GROWTH_REFUSED: "",
    ScaleAction.SHRANK_AHEAD: "",
    ScaleAction.TOLERATED: "scale kept (hysteresis)",
    ScaleAction.BACKED_OFF: "scale backed off",
    ScaleAction.REVERTED: "failed growth reverted",
    ScaleAction.FLOOR: "scale at its floor",
    ScaleAction.EXCUSED: "scale kept (not a scaling problem)",
    ScaleAction.SET: "scale set",
    ScaleAction.CALIBRATED: "scale calibrated",
}


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32, as GradScaler's float32 ``_scale`` tensor does."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: float32 arithmetic gives inf
        return math.copysign(math.inf, value)


def _invalid(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"AdaptiveLossScaler({field}={value!r}) is invalid: {field} must be {allowed}.")


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
    # None = HEADROOM_BITS, or RESCUED_HEADROOM_BITS while overflowing steps are rescued (ScalePolicy.rescuing).
    headroom_bits: float | None = None
    shrink_headroom_bits: float = 0.0625  # shrink ahead when S*amax comes this close to the overflow product
    probe_after: int = 32  # refused growth checks before the learned overflow product is relaxed
    floor_patience: int = 8  # confirmed overflows at the floor before on_floor / LossScaleFloorError
    format_max: float = FP16_MAX  # largest finite value of the low-precision format
    # Set the scale from the first clean step's measured amax (a fresh run only, never after a resume).
    # None = on with the predictive policy when init_scale is GradScaler's 2**16 (a scale chosen by the user
    # is kept), off with the dynamic policy (which then reproduces GradScaler).
    calibrate: bool | None = None

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
            raise ConfigError(
                f"AdaptiveLossScaler(min_scale={self.min_scale!r}, max_scale={self.max_scale!r}) is invalid:"
                " min_scale must be <= max_scale."
            )
        for name in ("headroom_bits", "shrink_headroom_bits"):
            value = getattr(self, name)
            if value is None and name == "headroom_bits":
                continue
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise _invalid(
                    name, value, "None or a finite number >= 0" if name == "headroom_bits" else "a finite number >= 0"
                )
        if self.calibrate is not None and not isinstance(self.calibrate, bool):
            raise _invalid("calibrate", self.calibrate, "None, True or False")
        if self.shrink_headroom_bits >= min(self.growth_headroom(False), self.growth_headroom(True)):
            raise ConfigError(
                f"AdaptiveLossScaler(shrink_headroom_bits={self.shrink_headroom_bits!r},"
                f" headroom_bits={self.headroom_bits!r}) is invalid: shrink_headroom_bits must be"
                f" < headroom_bits (None: {RESCUED_HEADROOM_BITS} when rescuing), or the scale would shrink right"
                " after every growth."
            )

    def growth_headroom(self, rescuing: bool) -> float:
        """The headroom growth leaves below the overflow product (``headroom_bits``, or its default)."""
        if self.headroom_bits is not None:
            return self.headroom_bits
        return RESCUED_HEADROOM_BITS if rescuing else HEADROOM_BITS

    @property
    def floor(self) -> float:
        return self.min_scale if self.min_scale is not None else _F32_TINY

    @property
    def calibrates(self) -> bool:
        if self.calibrate is not None:
            return self.calibrate
        return self.policy == "predictive" and self.init_scale == 2.0**16

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
        # Largest gradients measured *inside* the backward (flowing into module outputs), unscaled, one per
        # sampled step: what overflows first in fp16. Growth never takes S * max(these) past the format.
        self._backward_amax: deque[float] = deque(maxlen=config.amax_history)
        # A fresh run: the first clean step sets the scale (see calibrate). Cleared by that step or a resume.
        self.calibrating = config.calibrates
        self.rescues = 0  # overflowing steps re-run at a lower scale (counted by rescue())
        self.rescuing = False  # whoever drives the scaler rescues overflowing steps (AdaptiveMP sets it)

    @property
    def predictive(self) -> bool:
        return self.config.policy == "predictive"

    def set_scale(self, scale: float) -> None:
        """Force a scale (``GradScaler.update(new_scale)``); it still respects the floor and ceiling."""
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"new_scale={scale!r} is invalid: the loss scale must be a finite number > 0.")
        self._set(_f32(self.config.clamp(float(scale))))

    def acknowledge_floor(self) -> None:
        """The floor action was taken (an escalation): count the overflows at the floor from zero again."""
        self.floor_hits = 0

    def observe_backward_amax(self, amax: float) -> None:
        """The largest *unscaled* gradient that flowed inside this step's backward (into a module's output),
        measured on a sampled step. The predictive policy refuses a growth that would overflow it; a
        calibration uses it. Non-finite values (the step overflowed) say nothing and are ignored."""
        if math.isfinite(amax) and amax > 0:
            self._backward_amax.append(float(amax))

    def rescue(self, last: bool = False, current: float | None = None) -> float:
        """This step overflowed and will be re-run on the same batch: count the overflow, return the re-run's scale.

        The overflow is judged as :meth:`update` would judge it (hysteresis, revert of a failed growth,
        back-off), but no step is counted: the re-run's own ``update`` counts it. When the overflow is
        tolerated the scale stays where it is and only the re-run uses ``scale * backoff_factor``: an isolated
        spike costs one extra backward, neither the batch nor the scale.

        ``last=True``: the re-run at ``current`` overflowed too. The policy's scale goes at least one factor
        below ``current``, and the last re-run uses no loss scaling (1, or the floor if higher): what tells a
        gradient too large for the scale from one non-finite at any useful scale. Before the first clean step
        of a calibrating run nothing is known about the gradients yet: the re-run uses no scaling either (the
        first clean step then calibrates from what it measures).
        """
        self.rescues += 1
        config = self.config
        unscaled = max(config.floor, 1.0)
        if last:
            below = self._one_factor_below(current or self.scale)
            if below < self.scale:
                self._set(below)
                self.growth_tracker = 0
                self.backoffs += 1
            return min(unscaled, below)
        if self.calibrating:
            self.overflows += 1
            self.growth_tracker = 0
            return unscaled if unscaled < self.scale else self._one_factor_below(self.scale)
        self.steps += 1  # _on_overflow judges the hysteresis window at this step's number
        try:
            action = self._on_overflow()
        finally:
            self.steps -= 1
        return self._one_factor_below(self.scale) if action is ScaleAction.TOLERATED else self.scale

    def _one_factor_below(self, scale: float) -> float:
        """``scale`` backed off once, as float32 arithmetic rounds it, never below the floor."""
        return max(_f32(scale * self.config.backoff_factor), self.config.floor)

    def update(self, found_inf: bool, amax: float | None = None, scale_related: bool = True) -> ScaleAction:
        """Advance one optimizer step and return what was done.

        Args:
            found_inf: whether any gradient of this step was inf or NaN (the step was skipped).
            amax: largest absolute *unscaled* gradient of the step; ``None`` when not measured.
            scale_related: ``False`` when the non-finite value did not come from scaling (a bad batch, a
                forward overflow, a NaN loss): lowering the scale cannot fix it, so the scale and the
                growth tracker are left alone.

        Returns:
            What was done, as a :class:`ScaleAction`.
        """
        self.steps += 1
        if found_inf and not scale_related:
            self.overflows += 1
            return ScaleAction.EXCUSED
        if found_inf:
            return self._on_overflow()
        return self._on_clean(amax)

    def _on_overflow(self) -> ScaleAction:
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
            return ScaleAction.TOLERATED
        self._recent_overflows.clear()

        at_floor = self.scale <= config.floor
        before_growth = self._scale_before_growth
        a_ref = max(self._amax) if self._amax else None
        if self.predictive and a_ref is not None:
            # The product that overflowed is at least S * (largest recent amax); remember the lowest one.
            self.overflow_product = min(self.overflow_product, self.scale * a_ref)
        if self.predictive and not proven and before_growth is not None:
            new_scale, action = before_growth, ScaleAction.REVERTED  # undo the failed growth in one step
        else:
            new_scale, action = _f32(self.scale * config.backoff_factor), ScaleAction.BACKED_OFF
        self._refused_growths = 0
        self._set(max(new_scale, config.floor))
        self.backoffs += 1
        if at_floor:
            self.floor_hits += 1
            if self.floor_hits >= config.floor_patience:
                return ScaleAction.FLOOR
        return action

    def _set(self, scale: float, grown: bool = False) -> None:
        """Move to a new scale; a grown scale remembers where it came from (for a revert)."""
        self._scale_before_growth = self.scale if grown else None
        self.scale = scale
        self._clean_steps_at_scale = 0

    def _on_clean(self, amax: float | None) -> ScaleAction:
        config = self.config
        self.floor_hits = 0
        self._clean_steps_at_scale += 1
        self.growth_tracker += 1
        if self.calibrating:
            self.calibrating = False
            if self._calibrate(amax):
                return ScaleAction.CALIBRATED
        if self.predictive and amax is not None and math.isfinite(amax):
            self._amax.append(float(amax))
            if self._shrink_ahead():
                return ScaleAction.SHRANK_AHEAD
        if self.growth_tracker < config.growth_interval:
            return ScaleAction.HELD
        self.growth_tracker = 0
        return self._grow()

    def _calibrate(self, amax: float | None) -> bool:
        """Jump to the largest power-of-growth_factor multiple of the scale that keeps the largest measured
        gradient CALIBRATION_HEADROOM_BITS below the format's maximum.

        Only with a measurement from inside the backward (``observe_backward_amax``): what overflows first in
        fp16 is an activation gradient, often far larger than any parameter gradient, so a scale set from the
        parameter gradients alone would overflow. False (the scale is left alone) without one."""
        if not self._backward_amax:
            return False
        measured = [a for a in (amax, *self._backward_amax) if a is not None and math.isfinite(a) and a > 0]
        config = self.config
        target = config.format_max / (max(measured) * 2.0**CALIBRATION_HEADROOM_BITS)
        # Stay on the grid scale * growth_factor**k: the scale keeps its exact float32 powers of two.
        steps = math.floor(math.log(target / self.scale, config.growth_factor))
        new_scale = _f32(config.clamp(self.scale * config.growth_factor**steps))
        if not math.isfinite(new_scale) or new_scale == self.scale:
            return False
        self._set(new_scale)
        self.growth_tracker = 0
        self._amax.clear()
        return True

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
        new_scale = self._one_factor_below(self.scale)
        if new_scale >= self.scale:
            return False
        self._set(new_scale)
        self.growth_tracker = 0
        self.preemptive_backoffs += 1
        self._amax.clear()  # amax measured at the old scale says nothing new about the lower one
        return True

    def _grow(self) -> ScaleAction:
        config = self.config
        factor = config.growth_factor
        if self.predictive and self._amax and max(self._amax) > 0:
            headroom = config.growth_headroom(self.rescuing)
            room = self.overflow_product / (self.scale * max(self._amax) * 2.0**headroom)
            allowed = math.floor(math.log(room, config.growth_factor)) if room > 0 else 0
            # Until an overflow has measured P it is only the format's limit, a loose guess: cover half the
            # distance per growth (one failed probe at most). A measured P is trusted all the way.
            measured = self.overflow_product < config.format_max
            steps = allowed if measured or allowed < 2 else allowed // 2
            if self._backward_amax:
                # A gradient measured inside the backward overflows at S * a_bwd > format max, whatever the
                # parameter gradients say: attention-backward spikes live there.
                room_bwd = config.format_max / (self.scale * max(self._backward_amax) * 2.0**headroom)
                steps = min(steps, math.floor(math.log(room_bwd, config.growth_factor)) if room_bwd > 0 else 0)
            if steps < 1:
                self._refused_growths += 1
                if self._refused_growths >= config.probe_after:
                    # P may be stale (the model changed): forget one factor so the next check may probe,
                    # but never past the format's own limit (a clean step can not exceed it).
                    relaxed = self.overflow_product * config.growth_factor
                    self.overflow_product = min(relaxed, max(self.overflow_product, config.format_max))
                    self._refused_growths = 0
                return ScaleAction.GROWTH_REFUSED
            factor = config.growth_factor ** min(steps, _MAX_JUMP)
        new_scale = _f32(self.scale * factor)
        if config.max_scale is not None:
            new_scale = min(new_scale, config.max_scale)
        # GradScaler keeps the old scale when growth would overflow float32 to inf; so do we.
        if not math.isfinite(new_scale) or new_scale <= self.scale:
            return ScaleAction.HELD
        self._set(new_scale, grown=True)
        self.growths += 1
        return ScaleAction.GREW

    COUNTERS = (
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
        "rescues",
    )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        state.update(
            recent_overflows=list(self._recent_overflows),
            amax_history=list(self._amax),
            clean_steps_at_scale=self._clean_steps_at_scale,
            scale_before_growth=self._scale_before_growth,
            refused_growths=self._refused_growths,
            backward_amax=list(self._backward_amax),
            calibrating=self.calibrating,
            config=asdict(self.config),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and learned state; the configuration in force stays the constructed one."""
        for name in self.COUNTERS:
            if name in state:
                setattr(self, name, type(getattr(self, name))(state[name]))
        self._recent_overflows = deque(state.get("recent_overflows", ()))
        self._amax = deque(state.get("amax_history", ()), maxlen=self.config.amax_history)
        self._clean_steps_at_scale = int(state.get("clean_steps_at_scale", 0))
        self._scale_before_growth = state.get("scale_before_growth")
        self._refused_growths = int(state.get("refused_growths", 0))
        self._backward_amax = deque(state.get("backward_amax", ()), maxlen=self.config.amax_history)
        # A resumed run is never calibrated again: its scale was earned. (Only a checkpoint taken before the
        # first clean step still calibrates.)
        self.calibrating = bool(state.get("calibrating", False)) and self.config.calibrates


def floor_error(policy: ScalePolicy) -> LossScaleFloorError:
    """The error when the scale sits at its floor, keeps overflowing, and nobody handles it (no ``on_floor``)."""
    return LossScaleFloorError(
        f"The loss scale is at its floor ({policy.scale:g}) and the gradients still overflowed on"
        f" {policy.floor_hits} back-off(s) in a row (step {policy.steps}). Gradients that are"
        " not finite at any scale point at the forward pass or the loss, not at loss scaling. Try"
        " precision='bf16-mixed', running the overflowing modules in fp32"
        " (AdaptiveMP(fp32_modules=[...])), a lower learning rate or gradient clipping; or lower"
        " min_scale if the gradients are genuinely huge."
    )
