"""Step or skip: the two ways a format guards an optimizer step, behind one interface the core calls.

A *scaled* format (fp16) multiplies the loss by the loss scale and lets ``AdaptiveLossScaler`` unscale the
gradients, skip a step whose gradients overflowed and move the scale (``ScaledStep``). An unscaled format (bf16,
fp32) has fp32's range: a step is skipped only when its gradients hold an inf or NaN, found by one fused check
over the gradients (``GuardedStep``). The core never asks which one it holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp._compat import optimizer_handles_unscaling
from lightning_mp._grads import NonfiniteGuard
from lightning_mp.scaling.policy import ScaleAction
from lightning_mp.scaling.scaler import AdaptiveLossScaler

__all__ = ["GuardedStep", "ScaledStep", "Verdict"]


class Verdict:
    """Whether a step's gradients were non-finite, decided on the device and read later on the host.

    The flag is copied as soon as the check has run (to pinned memory on a GPU, with an event), so reading it
    at the next step waits, if at all, for work that step needs finished anyway.
    """

    def __init__(self, flag: Tensor, guard: NonfiniteGuard) -> None:
        self._guard = guard
        self._device = flag.device
        if flag.device.type == "cuda":
            self._host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = flag.clone(), None

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        found = bool(self._host.item())
        if not found:
            self._guard.mark_clean(self._device)
        return found

    def finish(self, scale_related: bool) -> None:
        """Nothing to update without a scale."""


class ScaledVerdict:
    """An fp16 step a fused optimizer skipped or took on the device: the scaler's update waits for its flags."""

    def __init__(self, scaler: AdaptiveLossScaler) -> None:
        self._scaler, self._deferred = scaler, scaler.deferred

    def read(self) -> bool:
        return self._deferred.read()[0]

    def finish(self, scale_related: bool) -> None:
        if self._scaler.deferred is self._deferred:  # not applied yet by a read of the scale in between
            self._scaler.finish_update(scale_related)


class GuardedStep:
    """bf16 / fp32: skip a step whose gradients are not finite (``guard_nonfinite=False``: never skip).

    Args:
        enabled: check at all (``guard_nonfinite``).
        sharded: each rank holds a shard of plain-tensor gradients: agree on the flag across ranks.
    """

    scaler = None
    calibrating = False

    def __init__(self, enabled: bool = True, sharded: bool = False) -> None:
        self.enabled, self.sharded = enabled, sharded
        self.guard = NonfiniteGuard()
        self._verdicts: dict[int, bool] = {}  # id(optimizer) -> the answer, asked before step() this step

    # ------------------------------------------------------------------------------ what the step reads
    @property
    def scale(self) -> float | None:
        return None

    @property
    def at_floor(self) -> bool:
        return False

    @property
    def last_action(self) -> ScaleAction | None:
        return None

    def can_help(self) -> bool:
        """Whether a lower scale could make a backward overflow finite: not without a scale."""
        return False

    def wants_backward_amax(self) -> bool:
        return False

    # --------------------------------------------------------------------------------------- the step
    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss

    def unscale(self, optimizer: Optimizer, rescuing: bool = False) -> None:
        """Nothing to unscale."""

    def nonfinite(self, optimizer: Optimizer) -> bool:
        """Whether this step's gradients hold an inf or NaN, asked before ``step`` (which then takes the answer)."""
        if not self.enabled:
            return False
        found = self._verdicts[id(optimizer)] = self.guard(optimizer, self.sharded)
        return found

    def step(self, optimizer: Optimizer, **kwargs: Any) -> tuple[bool | Verdict, Any]:
        """``(skipped, what optimizer.step returned)``: the step is taken only with finite gradients.

        An optimizer that can skip on the device (``fused=True`` Adam, AdamW, SGD take ``found_inf``, as
        GradScaler's fused path hands it) gets the flag and decides there: nothing is read on the host in this
        step, and ``skipped`` is a ``Verdict`` to read later (the next step reads it before its update).
        """
        verdict = self._verdicts.pop(id(optimizer), None)
        if verdict is None and self.enabled and optimizer_handles_unscaling(optimizer):
            flag = self.guard.check(optimizer, self.sharded)
            if flag is not None:
                optimizer.grad_scale, optimizer.found_inf = None, flag.reshape(())  # what fused kernels take
                try:
                    output = optimizer.step(**kwargs)
                finally:
                    del optimizer.grad_scale, optimizer.found_inf
                return Verdict(flag, self.guard), output
        bad = verdict if verdict is not None else (self.enabled and self.guard(optimizer, self.sharded))
        if bad:
            return True, None
        return False, optimizer.step(**kwargs)

    def can_skip_before_step(self, optimizer: Optimizer) -> bool:
        """Whether a step can be skipped without asking (the spike rule): always."""
        return True

    def skip(self) -> None:
        """A step skipped before it was asked (a loss spike): nothing to tell."""

    def settle(self, scale_related: bool) -> bool:
        """After the step: nothing to update, nothing learned late."""
        return False

    def end_step(self) -> None:
        self._verdicts.clear()

    def acknowledge_floor(self) -> None:
        """No floor without a scale."""

    def observe_backward_amax(self, value: float) -> None:
        """No scale to limit."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class ScaledStep:
    """fp16: the loss scaled by an ``AdaptiveLossScaler``, which unscales, skips on overflow and moves the scale.

    Args:
        scaler: the scaler (the user's, or one built for the device from the options).
        escalates: the core acts on the scaler's floor (its escalation ladder); ``False`` when the user gave
            the scaler an ``on_floor`` of their own.
    """

    def __init__(self, scaler: AdaptiveLossScaler, escalates: bool = True) -> None:
        self.scaler, self.escalates = scaler, escalates

    @property
    def scale(self) -> float:
        return self.scaler.get_scale()

    @property
    def at_floor(self) -> bool:
        """The last update reached the scale's floor and the core is to escalate."""
        return self.escalates and self.scaler.last_action is ScaleAction.FLOOR

    @property
    def last_action(self) -> ScaleAction | None:
        return self.scaler.last_action

    @property
    def calibrating(self) -> bool:
        return self.scaler.is_enabled() and self.scaler.policy.calibrating

    def can_help(self) -> bool:
        """Whether a lower scale could make a backward overflow finite: while the scale is above its floor."""
        return self.scaler.get_scale() > self.scaler.config.floor

    def wants_backward_amax(self) -> bool:
        """The predictive policy limits growth by the largest gradient inside the backward (sampled steps), and
        a calibrating scaler sets its first scale from it."""
        return self.calibrating or self.scaler.config.policy == "predictive"

    def scale_loss(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def unscale(self, optimizer: Optimizer, rescuing: bool = False) -> None:
        """Unscale, unless the optimizer does it inside ``step`` (fused) and no rescue needs the verdict first."""
        if rescuing or not optimizer_handles_unscaling(optimizer):
            self.scaler.unscale_(optimizer)

    def nonfinite(self, optimizer: Optimizer) -> bool:
        return self.scaler.overflowed(optimizer)

    def step(self, optimizer: Optimizer, **kwargs: Any) -> tuple[bool, Any]:
        skipped_before = self.scaler.skipped_steps
        output = self.scaler.step(optimizer, **kwargs)  # skips optimizer.step() on non-finite gradients
        return self.scaler.skipped_steps > skipped_before, output

    def can_skip_before_step(self, optimizer: Optimizer) -> bool:
        """A fused optimizer unscales inside ``step()`` (unless a rescue unscaled it): no point to skip it at."""
        return not optimizer_handles_unscaling(optimizer)

    def skip(self) -> None:
        """A step skipped before it was asked (a loss spike): its gradients were finite, the scale sees a clean
        iteration."""
        self.scaler.update()

    def settle(self, scale_related: bool) -> bool | ScaledVerdict:
        """After the step: update the scale; an overflow that lowering the scale cannot fix (a bad batch, a
        forward overflow, a gradient non-finite without scaling) is skipped without a back-off. Returns whether
        the update found a skip ``step`` could not see: a fused optimizer skips itself on the device, and its
        flags are read here, once."""
        if not scale_related:
            self.scaler.excuse_overflow()
        skipped_before = self.scaler.policy.skipped_steps
        self.scaler.update()
        if self.scaler.deferred is not None:  # a fused step with no rescue: its flags are read later
            return ScaledVerdict(self.scaler)
        return self.scaler.policy.skipped_steps > skipped_before

    def end_step(self) -> None:
        """Nothing kept between steps."""

    def acknowledge_floor(self) -> None:
        self.scaler.policy.acknowledge_floor()

    def observe_backward_amax(self, value: float) -> None:
        self.scaler.observe_backward_amax(value)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)
