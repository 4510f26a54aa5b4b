"""``StepGuard``: step or skip, and judge what happened: where a skipped step went non-finite (attribution, a
replay), how the scale moves, and what ``Decisions`` makes of it.

A non-fused optimizer needs the verdict before ``step()``: the stepper reads it on the host, once, and the step is
judged at once. An optimizer that skips on the device (``fused=True``) is handed the flag instead; its verdict is
read later, before the next micro-batch, step or checkpoint (``settle_pending``), while the step's batch,
gradients and buffers are still as it left them. What must wait for it (a skip-aware LR scheduler) registers
with ``when_settled``, so the learning rate of every update is the one it would have been with a host read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from lightning_mp.diagnosis.attribution import Finding, OverflowTracker
from lightning_mp.diagnosis.replay import StepReplay
from lightning_mp.reporting.history import ScaleHistory
from lightning_mp.scaling.rescue import Rescue
from lightning_mp.scaling.stepper import ScaledVerdict, Verdict
from lightning_mp.step.batch import Batch
from lightning_mp.step.decisions import Decisions
from lightning_mp.step.precision import RunPrecision

__all__ = ["StepGuard"]


class StepGuard:
    """Steps an optimizer (or skips it) and judges the step.

    Args:
        setting: the format and stepper in force.
        batch: the step's batch (its buffers, backward passes, what a re-run starts from).
        tracker: attribution's per-step flags.
        replay: the kept micro-batches a replay runs again.
        rescue: whether this step was re-run, and whether it stayed non-finite without scaling.
        decisions: what a step's outcome leads to.
        scales: the loss scale after every step.
        warn: how to tell the user.
    """

    def __init__(
        self,
        setting: RunPrecision,
        batch: Batch,
        tracker: OverflowTracker,
        replay: StepReplay,
        rescue: Rescue,
        decisions: Decisions,
        scales: ScaleHistory,
        warn: Callable[[str], None],
    ) -> None:
        self.setting, self.batch, self.tracker, self.replay = setting, batch, tracker, replay
        self.rescue, self.decisions, self.scales, self.warn = rescue, decisions, scales, warn
        self.pending: tuple | None = None  # the last step's device verdict, not read yet (settle_pending)
        self._waiting: list[Callable[[bool], None]] = []  # what waits for it (when_settled)

    def step_or_skip(self, optimizer: Optimizer, kwargs: dict[str, Any]) -> Any:
        """Step, or skip a step whose gradients are not finite (or whose loss is a spike); then decide."""
        stepper, decisions = self.setting.stepper, self.decisions
        repeat = self.tracker.note_optimizer(id(optimizer))  # another optimizer already skipped on this batch
        scale = stepper.scale  # what this step's gradients carried; the settle below may move it
        spike = decisions.spike(optimizer)
        if spike is not None:
            stepper.skip()
            decisions.after_step(optimizer, Finding.spike(), repeat, skipped=True, scale=scale, spike=spike)
            return None
        skipped, output = stepper.step(optimizer, **kwargs)
        if not isinstance(skipped, Verdict):
            finding = self._diagnose() if skipped else None
            late = stepper.settle(self._scale_related(finding))
            if not isinstance(late, ScaledVerdict):
                repeat = repeat and finding is not None
                decisions.after_step(optimizer, finding, repeat, skipped=skipped or late, scale=scale)
                return output
            skipped = late
        # Decided on the device (an optimizer that skips there): read and acted on before the next update.
        self.pending = (optimizer, skipped, repeat, scale)
        return output

    def settle_pending(self) -> None:
        """Read the verdict of a step an optimizer skipped or took on the device (no host read in that step) and
        judge it as ``step_or_skip`` would have."""
        if self.pending is None:
            return
        optimizer, verdict, repeat, scale = self.pending
        self.pending = None
        skipped = verdict.read()
        finding = self._diagnose() if skipped else None
        verdict.finish(self._scale_related(finding))
        self.record_scale()
        self.decisions.after_step(optimizer, finding, repeat and skipped, skipped=skipped, scale=scale)
        waiting, self._waiting = self._waiting, []
        for then in waiting:
            then(skipped)

    def when_settled(self, optimizer: Optimizer, then: Callable[[bool], None]) -> None:
        """Call ``then(skipped)`` once ``optimizer``'s last step is known: now, or when its device verdict is
        read (what a skip-aware LR scheduler does, so that the update after it uses the same learning rate)."""
        if self.pending is not None and self.pending[0] is optimizer:
            self._waiting.append(then)
        else:
            then(self.decisions.step_was_skipped(optimizer))

    def record_scale(self) -> None:
        """The scale after this step, for the report's plot (a host float: no sync)."""
        scaler = self.setting.scaler
        if scaler is not None:
            self.scales.record(self.decisions.ledger.optimizer_steps, scaler.get_scale())

    def _scale_related(self, finding: Finding | None) -> bool:
        """Lowering the scale cannot fix a bad batch, a forward overflow, or a gradient non-finite without scaling
        (a rescue's last re-run showed it)."""
        return finding is None or (finding.phase == "backward" and not self.rescue.nonfinite_unscaled)

    def _diagnose(self) -> Finding:
        """Where a skipped step went non-finite: the cheap flags, then a replay under the tracer."""
        model = self.decisions.model
        if model is None:
            return Finding("backward", None, "nan", "unknown")
        setting, batch = self.setting, self.batch
        replay = self.replay.replayer(
            model, batch.buffers.restore, setting.autocast, setting.stepper.scale, batch.backward_passes, self.warn
        )
        finding = self.tracker.attribute(model, replay)
        if replay is not None and self.rescue.enabled(setting.scaler):
            batch.rerun_state.learn(self.replay.written)  # what the replayed step wrote in place, for a rescue
        return finding
