"""``Batch``: the state of one optimizer step's batch, from its first micro-batch to the step that ends it.

A batch begins before the first micro-batch's forward, whichever hook sees it first (Lightning's
``training_step``, Fabric's first forward or backward): attribution forgets the last batch, the buffers a
skipped step puts back are copied, the RNG is kept for a replay or a re-run, and what a rescue re-run must start
from is copied. Each micro-batch is kept (how to run it again) and observed (a reference to its input); each
backward pass is counted. A rescue runs the whole batch again from where it began (``rerun``); the optimizer
step ends the batch (``end``), and the next micro-batch begins a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_mp.diagnosis.attribution import OverflowTracker
from lightning_mp.diagnosis.replay import StepReplay
from lightning_mp.diagnosis.statistics import ModuleStatistics
from lightning_mp.step.buffers import BufferSnapshot
from lightning_mp.step.side_effects import RerunState, WriteWatch

__all__ = ["Batch"]

Run = Callable[[Callable[[Tensor], None]], None]


class Batch:
    """One optimizer step's batch.

    Args:
        tracker: attribution's per-batch flags (inputs, losses).
        replay: the kept micro-batches and the RNG state.
        buffers: the buffers a skipped step puts back.
        statistics: a sampled step's statistics (a re-run measures again).
        rerun_state: what a rescue re-run starts from beyond buffers and RNG.
    """

    def __init__(
        self,
        tracker: OverflowTracker,
        replay: StepReplay,
        buffers: BufferSnapshot,
        statistics: ModuleStatistics,
        rerun_state: RerunState,
    ) -> None:
        self.tracker, self.replay, self.buffers = tracker, replay, buffers
        self.statistics, self.rerun_state = statistics, rerun_state
        self.due = True  # the next micro-batch begins a new batch
        self.micro_batches = 0  # micro-batches so far (a kernel-error retry restores only the first)
        self.backward_passes = 0  # backward passes so far (manual optimization: before each optimizer step)
        self.stepped = False  # an optimizer stepped cleanly on this batch: its buffer updates are kept
        self.rerunning = False  # a rescue re-run is in progress: its micro-batch is not a new one
        self._observed: Any = None  # the input observed last (identity): observed once however often it runs

    def begin_if_due(self, model: nn.Module | None, device: str | None, rescuing: bool) -> None:
        """Before the first micro-batch's forward: a new batch for attribution, copies of what a skipped step
        or a re-run puts back."""
        if not self.due:
            return
        self.due = False
        self._observed = None
        self.tracker.new_batch()
        self.buffers.take()
        self.replay.begin_batch(device)
        self.micro_batches = self.backward_passes = 0
        self.stepped = False
        if model is not None and rescuing:
            self.rerun_state.take(model)

    def start_micro_batch(self) -> bool:
        """A micro-batch's forward begins; False when it is a rescue's re-run of one already counted."""
        if self.rerunning:
            return False
        self.micro_batches += 1
        self.tracker.start_micro_step()
        return True

    def keep(self, run: Run, batch: Any) -> None:
        """Keep how to run the micro-batch again and observe its input (LBFGS and a rescue run the same
        micro-batch again: observed once). References only."""
        self.replay.keep(run)
        self.observe(batch)

    def observe(self, batch: Any) -> None:
        if batch is not self._observed:
            self._observed = batch
            self.tracker.observe_input(batch)

    def backward(self, loss: Tensor) -> None:
        """A backward pass of ``loss`` is about to run."""
        self.backward_passes += 1
        self.tracker.observe_loss(loss)

    def rerun(self, model: nn.Module, run: Callable[[Callable[[list[Run]], Any]], Any], rerun: Any) -> list[str]:
        """Run the batch's forward and backward again for a rescue, from where it began. ``run(fn)`` runs
        ``fn`` as the step's closure (a kernel error promotes and retries); ``rerun(runs)`` is the shell's way of
        running the step again. Returns the parameters the re-run wrote that were not copied at the batch's
        start (put back as the first attempt left them; see ``side_effects.RerunState``)."""
        runs = self.replay.kept
        accumulated = self.micro_batches > 1
        self.statistics.discard()
        self.buffers.restore()
        self.replay.restart_batch(keep_runs=accumulated)
        self.tracker.forget_losses()
        self.backward_passes = 0
        self.rerun_state.before_rerun(model)
        watch = WriteWatch(model.named_parameters())
        self.rerunning = True
        try:
            with watch:
                run(lambda: rerun(runs if accumulated else []))
        finally:
            self.rerunning = False
        return self.rerun_state.after_rerun(watch)

    def end(self) -> None:
        """The optimizer step is over: the next micro-batch begins a new batch."""
        self.due = True

    def forget(self) -> None:
        """Teardown: drop references to the user's last batch."""
        self._observed = None
        self.replay.clear()
