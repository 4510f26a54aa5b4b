"""The rescue: an fp16 step that overflowed in its backward because of the loss scale is run again on the same
batch at a lower scale, instead of being skipped.

When: the step's inputs and losses are finite (the overflow was born in the backward), the scale is above its
floor, and the shell can run the step again (one micro-batch through Lightning's closure, or every kept
micro-batch of an accumulated step; not manual optimization, not Fabric, not across ranks with accumulation).
``rescue=None`` turns it on with the predictive policy and off with ``policy="dynamic"``, which then reproduces
GradScaler.

How often: the first re-run uses the scale the policy chooses; if that overflows too, the last one runs without
loss scaling (scale 1, or the floor if higher). Still non-finite there, the gradient is non-finite at any useful
scale: the policy's state from before the step is put back and the step is skipped, excused (a backward NaN is
not the scale's fault; repeated, it is blamed on its module like a forward overflow).

What a re-run starts from (``step.batch.Batch.rerun``): BatchNorm statistics, the RNG, parameters the step
writes in place and the LightningModule's attributes as the batch began, so the rescued step is the step a run
at the lower scale would have taken, dropout included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from lightning_mp._grads import distributed
from lightning_mp.scaling.scaler import AdaptiveLossScaler

__all__ = ["RESCUE_ATTEMPTS", "Rescue"]

# Re-runs of one step's forward/backward before it is skipped after all: the first at the scale the policy
# chooses, the last without loss scaling.
RESCUE_ATTEMPTS = 2


class Rescue:
    """The rescue decision and its re-run budget for one run.

    Args:
        option: ``AdaptiveMP(rescue=...)``: ``None`` (with the predictive policy), ``True`` or ``False``.
    """

    def __init__(self, option: bool | None) -> None:
        self.option = option
        self.passes = 0  # re-runs of the current step
        self.nonfinite_unscaled = False  # this step's gradients stayed non-finite when re-run without scaling

    def enabled(self, scaler: AdaptiveLossScaler | None) -> bool:
        """Whether overflows of this run are rescued at all."""
        if scaler is None or not scaler.is_enabled() or self.option is False:
            return False
        return self.option or scaler.config.policy == "predictive"

    def begin_batch(self) -> None:
        self.passes, self.nonfinite_unscaled = 0, False

    @property
    def rescued(self) -> bool:
        """Whether the current step was run again."""
        return self.passes > 0

    def applies(self, scaler: AdaptiveLossScaler | None, micro_batches: int, kept_runs: int, replaying: bool) -> bool:
        """Whether an overflow of this step can be rescued: rescues are on, and the shell can run the step again
        (one micro-batch, or every micro-batch kept and the run on one process: across ranks each micro-batch
        but the last would need the strategy's no-sync context again), outside a replay."""
        one_process = not distributed()
        runnable = micro_batches == 1 or (kept_runs == micro_batches and one_process)
        return self.enabled(scaler) and runnable and not replaying

    def unscale(
        self,
        stepper: Any,
        optimizer: Optimizer,
        can_rescue: bool,
        forward_finite: Callable[[], bool],
        run_again: Callable[[], Any],
    ) -> Any:
        """Unscale this step's gradients and, when ``can_rescue``, run it again while they overflowed; returns
        the last re-run's result, if any (the closure's result of a rescued step)."""
        if stepper.scaler is not None:  # growth may go closer to the edge where an overflow costs a re-run
            stepper.scaler.policy.rescuing = can_rescue
        stepper.unscale(optimizer, rescuing=can_rescue)
        if not can_rescue:
            return None
        results: list[Any] = []
        self.run(stepper.scaler, optimizer, forward_finite, lambda: results.append(run_again()))
        return results[-1] if results else None

    def run(
        self,
        scaler: AdaptiveLossScaler,
        optimizer: Optimizer,
        forward_finite: Callable[[], bool],
        run_again: Callable[[], Any],
    ) -> None:
        """After ``unscale_``: while the gradients overflowed and a rescue applies, lower the scale and
        ``run_again()`` (the step's forward and backward, from where the batch began), then unscale again."""
        policy, before = scaler.policy, None
        while scaler.overflowed(optimizer):
            if self.passes == RESCUE_ATTEMPTS:
                # Non-finite without scaling: the step's back-offs could not have helped. Put the policy back as
                # it was before its rescues, keeping the count of rescues made.
                self.nonfinite_unscaled = True
                rescues = policy.rescues
                policy.load_state_dict(before)
                policy.rescues = rescues
                return
            if scaler.get_scale() <= scaler.config.floor or not forward_finite():
                return  # the floor rule, or a bad batch / forward overflow: skip, attribute and record as usual
            before = before or policy.state_dict()
            self.passes += 1
            scaler.rescue(last=self.passes == RESCUE_ATTEMPTS)
            run_again()
            scaler.unscale_(optimizer)
