"""``AdaptiveLossScaler``: a ``torch.amp.GradScaler`` whose update rule is :class:`~.policy.ScalePolicy`.

It is a drop-in GradScaler: ``scale``, ``unscale_``, ``step``, ``update``, ``get_scale``, ``state_dict`` and
``load_state_dict`` behave as documented there, it works in a hand-written loop and inside Lightning's own
``MixedPrecision(scaler=...)``. Only the update rule differs (see the package docstring), and it adds no
host-device synchronisation: found-inf flags and the gradient amax are read together on the one ``.item()``
GradScaler.step already does, and the scale lives on the host, so ``get_scale()`` and ``state_dict()`` need no
sync at all. (Optimizers that unscale inside a fused kernel never sync in ``step``; for them ``update`` reads
the flags once.)

This file and ``flags.py`` are the only ones of the package that touch GradScaler's internals. They override
five of GradScaler's private hooks (listed in ``lightning_mp/_compat.py``, each pinned by
``tests/unit/test_compat.py``) for one reason: to read the gradient amax on the one host synchronisation
``GradScaler.step`` already does, instead of adding a second one per step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch

from lightning_mp._compat import OptState, foreach_non_finite_check_and_unscale_, refresh_per_optimizer_state
from lightning_mp._grads import amax, group_by_device_and_dtype, is_sharded
from lightning_mp.scaling.flags import DeferredFlags, gradients_to_unscale, read_flags
from lightning_mp.scaling.policy import ScaleAction, ScalePolicy, ScalerConfig, _f32, _invalid, floor_error

__all__ = ["AdaptiveLossScaler"]


class AdaptiveLossScaler(torch.amp.GradScaler):
    """A :class:`torch.amp.GradScaler` with a better update rule, counters, and a defined floor (a drop-in: see
    the module docstring).

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
        factors = {"growth_factor": growth_factor, "backoff_factor": backoff_factor}
        config = ScalerConfig(init_scale=init_scale, growth_interval=growth_interval, policy=policy, **factors, **knobs)
        super().__init__(device, config.init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._policy = ScalePolicy(config)
        self._policy.calibrating &= enabled  # a disabled scaler never updates: nothing to calibrate
        self._init_scale = self._policy.scale
        self.on_floor = on_floor
        # amax costs one extra reduction over the gradients; only pay for it when someone reads it.
        self.track_amax = config.policy == "predictive"
        self.last_amax: float | None = None  # unscaled gradient amax of the last step, when tracked
        self.last_action: ScaleAction | None = None  # what the last update() did
        self._excused = False
        self.deferred: DeferredFlags | None = None  # a fused iteration's flags, until finish_update() reads them
        self._rerun_scale: float | None = None  # the scale of this step's re-run (rescue), until update()
        self._sharded = False  # this step's gradients are shards: flags must be combined across ranks
        # Set by whoever knows that each rank holds only a shard of plain-tensor gradients (FSDP1's flat
        # parameters; AdaptiveFSDPMP sets it). DTensor shards (FSDP2) are recognised without it.
        self.sharded_gradients = False
        # fp16 gradients are unscaled in place ("16-true" without fp32 masters); GradScaler refuses them.
        self.allow_fp16_gradients = False

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
        if self.deferred is not None:
            self.finish_update()
        return self._policy.skipped_steps

    @property
    def counters(self) -> dict[str, float]:
        """Counters a user may want to log: scale, skipped steps, overflows, back-offs, growths, ..."""
        state = self._policy.state_dict()
        return {name: state[name] for name in ScalePolicy.COUNTERS}

    @property
    def rescues(self) -> int:
        """Overflowing steps re-run at a lower scale on the same batch (see :meth:`rescue`)."""
        return self._policy.rescues

    def scale(self, outputs: Any) -> Any:
        if self.deferred is not None:  # the last iteration's flags (a fused step), read now that they are needed
            self.finish_update()
        return super().scale(outputs)

    def get_scale(self) -> float:
        # The scale lives on the host: no sync, unlike GradScaler.get_scale(). Between rescue() and update()
        # it is the scale the re-run's gradients carry.
        if not self._enabled:
            return 1.0
        if self.deferred is not None:
            self.finish_update()
        return self._rerun_scale if self._rerun_scale is not None else self._policy.scale

    def overflowed(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this optimizer's gradients, unscaled by ``unscale_`` this iteration, hold an inf or NaN.

        It reads the flags on the host synchronisation ``step`` would do anyway (``step`` reuses the answer).
        """
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is not OptState.UNSCALED:
            raise RuntimeError("overflowed() needs unscale_(optimizer) first in this iteration.")
        if not state["found_inf_per_device"] and state.get("scaled_amax") is None:
            return False  # no parameter of this optimizer has a gradient: nothing could overflow
        return self._read_flags(state)[0]

    def rescue(self, last: bool = False) -> float:
        """Prepare to re-run an overflowing iteration's forward/backward on the same batch at a lower scale.

        Call after ``unscale_`` found an overflow and before ``step``; then zero the gradients, run the
        forward/backward again (``scale(loss)`` uses the returned scale) and ``unscale_``, ``step`` and
        ``update`` as usual. The overflow is counted and judged by the policy (see
        :meth:`ScalePolicy.rescue`); no step is skipped. ``last=True``: the previous re-run overflowed too; this
        one runs without loss scaling. Returns the re-run's scale.
        """
        self._check_scale_growth_tracker("rescue")
        assert self._scale is not None
        scale = self._policy.rescue(last, current=self.get_scale())
        self._rerun_scale = scale  # what the re-run's gradients carry, whatever the policy does next
        self._scale.fill_(scale)
        self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
        return scale

    def observe_backward_amax(self, scaled_amax: float) -> None:
        """The largest gradient seen inside this iteration's backward, as measured (still scaled)."""
        self._policy.observe_backward_amax(scaled_amax / self.get_scale())

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
        with torch.no_grad():
            grads = gradients_to_unscale(optimizer, allow_fp16 or self.allow_fp16_gradients)
            if self.track_amax:
                scaled_amax = amax(grads, inv_scale.device)
                self._per_optimizer_states[id(optimizer)]["scaled_amax"] = scaled_amax
            self._sharded = self.sharded_gradients or is_sharded(grads)
            found_per_device = {}
            for device, by_dtype in group_by_device_and_dtype(grads).items():
                found_per_device[device] = found_inf.to(device, copy=True) if device != found_inf.device else found_inf
                for same in by_dtype.values():
                    foreach_non_finite_check_and_unscale_(same, found_per_device[device], inv_scale.to(device))
        return found_per_device

    def _read_flags(self, optimizer_state: dict[str, Any]) -> tuple[bool, float | None]:
        assert self._scale is not None
        return read_flags(optimizer_state, self._scale.device, self._sharded, self.get_scale())

    def _maybe_opt_step(
        self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> float | None:
        # GradScaler syncs here to decide whether to step; we read the amax on the same sync (or already did,
        # in overflowed()).
        found, _ = optimizer_state["host"] if "host" in optimizer_state else self._read_flags(optimizer_state)
        if found:
            self._policy.skipped_steps += 1
            optimizer_state["skip_counted"] = True
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
        self.finish_update()
        self._check_scale_growth_tracker("update")
        assert self._scale is not None and self._growth_tracker is not None
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("new_scale must be a float or a 1-element tensor with requires_grad=False.")
                new_scale = float(new_scale.item())
            self._policy.set_scale(new_scale)
            action = ScaleAction.SET
            self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
        else:
            states = [s for s in self._per_optimizer_states.values() if s["found_inf_per_device"]]
            if not states:
                raise AssertionError("No inf checks were recorded prior to update.")
            for state in states:
                state["stepped"] = state["stage"] is OptState.STEPPED
            self.deferred = DeferredFlags(states, self._scale.device, self._sharded, self.get_scale())
            self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
            if self.deferred.ready:  # every flag was read on step()'s sync already: update now
                self.finish_update()
            return  # a fused step's flags: read when the next iteration needs the scale (finish_update)
        self._settle(action)

    def finish_update(self, scale_related: bool | None = None) -> None:
        """Apply a deferred update: read the flags now, move the scale (``scale_related=False`` excuses an
        overflow that lowering the scale cannot fix; by default, ``excuse_overflow`` decides)."""
        deferred, self.deferred = self.deferred, None
        if deferred is None:
            return
        found_any, amaxes, skips = deferred.read()
        self._policy.skipped_steps += skips
        self.last_amax = max(amaxes) if amaxes and not found_any else None
        related = not self._excused if scale_related is None else scale_related
        self._settle(self._policy.update(found_any, self.last_amax, scale_related=related))

    def _settle(self, action: ScaleAction) -> None:
        self._excused = False
        self._rerun_scale = None
        # fill_ with a Python number is an asynchronous host-to-device write: no sync.
        self._scale.fill_(self._policy.scale)
        self._growth_tracker.fill_(self._policy.growth_tracker)
        self.last_action = action
        if action is ScaleAction.FLOOR:
            self._at_floor()

    def _at_floor(self) -> None:
        if self.on_floor is not None:
            self.on_floor(self)
            return
        raise floor_error(self._policy)

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """GradScaler's five entries, plus ``"adaptive"``: the policy's counters and learned state."""
        if not self._enabled:
            return {}
        state = super().state_dict()
        state["scale"] = self._policy.scale  # not a rescue's re-run scale, if saved between rescue() and update()
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
