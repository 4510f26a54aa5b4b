"""``PrecisionCore``: everything ``AdaptiveMP`` does, without Lightning.

The Lightning plugins are shells of hooks over this class (``plugin.py``; ``fsdp.py`` holds an ``AdaptiveMP``);
a Fabric plugin or a hand-written loop can drive it the same way. One optimizer step, in order::

    core.start_step()                  # count it (before the closure: sampling and promotions use the number)
    core.start_micro_step()            # per micro-batch: arms sampled statistics
    with core.autocast():              #   forward under autocast
        ...; core.observe_input(batch)
    loss = core.scale_loss(loss)       #   backward of the scaled loss (fp16)
    core.run_closure(closure)          # or the above through a closure: kernel errors promote and retry
    core.unscale(optimizer, rerun=...) # unscale (fp16; an overflow born in the backward re-runs the step at a
                                       # lower scale), then sample statistics; clip after this
    core.step(optimizer, **kwargs)     # step or skip, attribute a bad step, promote, escalate, record
    core.end_step()

Each collaborator has one job (see its module): ``precision.py`` resolves ``"auto"``; the scaler lives in
``scaling/``; ``_grads.NonfiniteGuard`` is the bf16/fp32 guard; ``attribution.py`` finds where a bad step
went non-finite; ``fallback.py`` runs modules as fp32 islands; ``escalation.py`` is the ladder; ``ledger.py``
records what happened; ``statistics.py`` samples headroom and underflow; ``buffers.py`` puts BatchNorm
statistics back when a step is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from collections.abc import Callable
from statistics import median
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp._compat import optimizer_handles_unscaling, scaler_device
from lightning_mp._grads import NonfiniteGuard, all_reduce, distributed, is_sharded
from lightning_mp.attribution import Finding, OverflowTracker, is_kernel_error, module_from_traceback
from lightning_mp.buffers import BufferSnapshot
from lightning_mp.escalation import Escalation, EscalationLadder, give_up_message
from lightning_mp.fallback import FallbackManager
from lightning_mp.hooks import eager
from lightning_mp.ledger import Rung, RunLedger, ScaleHistory
from lightning_mp.options import PluginOptions
from lightning_mp.precision import AUTOCAST_DTYPES, autocast, default_device, resolve_auto_precision
from lightning_mp.replay import StepReplay
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError, ScaleAction
from lightning_mp.side_effects import RerunState, WriteWatch
from lightning_mp.statistics import ModuleStatistics

__all__ = ["PrecisionCore"]

# The sanity rule after a promotion. A module promoted to fp32 turns an overflow into a finite value; if the
# harm itself recurs (a bad batch, a diverging layer), the next such step is finite but huge, and applying it
# would wreck the weights the skip protected. So for ``promote_window`` steps after a promotion, a step whose loss
# (mean magnitude over its backward passes) exceeds SPIKE_FACTOR times the median of the last SPIKE_HISTORY clean
# steps' losses before the promotion is skipped as a "spike". It reads the loss on the host once per step, only
# in that window (a clean run never pays it).
SPIKE_FACTOR = 100.0
SPIKE_HISTORY = 16
# Statistics sample one optimizer step in this many unless ``stats_every`` says otherwise: fp16 runs out of range
# and its predictive scaler reads the samples; bf16 and fp32 have fp32's range, where a sample only watches for
# values running away (a quarter of the cost on small, fast steps). The default also samples the first step.
STATS_EVERY = {"16-mixed": 25, "bf16-mixed": 100, "32-true": 100}
# Re-runs of one step's forward/backward before it is skipped after all (a rescue): the first at the scale
# the policy chooses, the last without loss scaling (still non-finite there: not a scaling problem).
RESCUE_ATTEMPTS = 2


class PrecisionCore:
    """The precision state of one run and the decisions taken on it, driven one optimizer step at a time.

    Args:
        options: the validated knobs (see :class:`~lightning_mp.AdaptiveMP` for each one).
    """

    def __init__(self, options: PluginOptions) -> None:
        self.options = options
        self.precision = options.precision
        self.device = options.device_type
        self.scaler = options.scaler if isinstance(options.scaler, AdaptiveLossScaler) else None
        self._own_scaler = self.scaler is None  # ours may be rebuilt for the model's device; the user's may not
        self.fallback = FallbackManager(
            options.fp32_modules, options.fp32_defaults, options.promote_after, options.promote_window
        )
        self.tracker = OverflowTracker(options.watch_steps)
        self.ladder = EscalationLadder(options.max_consecutive_skips)
        self.ledger = RunLedger(options.max_events)
        self.scales = ScaleHistory()  # the loss scale after every optimizer step (fp16), for the report's plot
        self.statistics = ModuleStatistics(options.stats)
        self.buffers = BufferSnapshot()  # what a skipped step puts back (BatchNorm statistics)
        self.guard = NonfiniteGuard()  # bf16/fp32: skip a step whose gradients are not finite
        self._verdicts: dict[int, bool] = {}  # id(optimizer) -> the guard's answer, asked before step() this step
        # A bad step is replayed under a tracer to name its operation and line. Not with sharded gradients
        # (FSDP): a replayed forward/backward would run the strategy's collectives again.
        self.replay = StepReplay()
        self.replay.enabled = options.replay and not options.sharded_gradients
        self.tracker.replayer = self._replay
        # fp16: re-run a step that overflowed in the backward at a lower scale instead of skipping it. Not with
        # sharded gradients, for the same reason as the replay. None = on with the predictive scaler policy.
        self._rescue_option = False if options.sharded_gradients else options.rescue
        self.replay.save_rng = self._rescue_option is not False  # a re-run draws the same dropout masks
        self.rerun_state = RerunState()  # a re-run starts from the step's own start (an EMA teacher, a counter)
        self._rescue_passes = 0  # re-runs of the current step
        self._nonfinite_unscaled = False  # this step's gradients stayed non-finite when re-run without scaling
        self._rerunning = False  # a rescue re-run is in progress: its micro-step is not a new one
        self._backward_passes = 0  # backward passes of this optimizer step so far (manual: before each step)
        self._batch_due = True  # the next micro-batch begins a new optimizer step (a new batch)
        self._observed: Any = None  # the micro-batch observed last (identity): observed once however often it runs
        self._micro_batches = 0  # micro-batches of this step (a kernel-error retry restores only the first)
        self._batch_stepped = False  # an optimizer stepped cleanly on this batch: its buffer updates are kept
        self._floor_pending = False  # the scaler reached its floor on a step whose event was already recorded
        self.model: nn.Module | None = None
        self.switched_to_bf16 = False
        self._last_step_skipped: dict[int, bool] = {}  # id(optimizer) -> skipped, for the LR schedulers
        self._last_skipped = False  # the last optimizer step of the run, whichever optimizer
        self._clean_losses: deque[list[Tensor]] = deque(maxlen=SPIKE_HISTORY)  # references; read after a promotion
        self._probation_until = 0  # last optimizer step of the spike rule's window (0: no window open)
        self._loss_reference: float | None = None  # median recent loss magnitude before the promotion
        if self.precision == "16-mixed" and self.scaler is None:
            self.scaler = AdaptiveLossScaler(self.device or default_device(), **options.scaler_knobs)
            if options.scaler_state:
                self.scaler.load_state_dict(options.scaler_state)
        # A scaler the user passed is put back to this state when a later fit starts afresh (``restart``).
        self._scaler_at_start = None if self._own_scaler or self.scaler is None else self.scaler.state_dict()
        if self.precision != "auto":
            self.resolve(self.device)

    def restart(self) -> PrecisionCore:
        """A core for a new fit with the same options: counts, events, promotions, the scale and its history,
        and everything learned start afresh, as they did for the first fit; a scaler the user passed is put
        back to its state at construction. (A resumed fit then restores them from its checkpoint.)"""
        if self._scaler_at_start is not None and self.options.scaler is not None:
            self.options.scaler.load_state_dict(self._scaler_at_start)
        return PrecisionCore(self.options)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    @property
    def stats_dtype(self) -> torch.dtype:
        """The format headroom and underflow are judged against: the autocast dtype, fp32 without one."""
        return self.autocast_dtype or torch.float32

    @property
    def stats_every(self) -> int:
        """Sample the statistics on one optimizer step in this many (``STATS_EVERY`` unless set)."""
        return self.options.stats_every or STATS_EVERY.get(self.precision, 25)

    @property
    def skipped_steps(self) -> int:
        return self.ledger.guard_skipped + (self.scaler.skipped_steps if self.scaler is not None else 0)

    def step_was_skipped(self, optimizer: Optimizer | None = None) -> bool:
        """Whether the last step of ``optimizer`` was skipped (what a skip-aware LR scheduler asks); with no
        optimizer, whether the last optimizer step of the run was."""
        if optimizer is None:
            return self._last_skipped
        return self._last_step_skipped.get(id(optimizer), False)

    # ------------------------------------------------------------------------------------------ setup
    def resolve(self, device: str | None) -> None:
        """Fix the precision, the autocast device and the scaler once the device is known."""
        if self.precision == "auto":
            if device is None:
                return  # wait for setup, where the model tells us its device
            self.precision = resolve_auto_precision(device)
            if self.scaler is not None and self.precision != "16-mixed":
                rank_zero_warn(f"AdaptiveMP(precision='auto') resolved to {self.precision!r}: the scaler is unused.")
                self.scaler = None
        if device is None:
            return
        self.device = device
        if self.precision != "16-mixed":
            return
        if self.scaler is None or (self._own_scaler and scaler_device(self.scaler) != device):
            self.scaler = AdaptiveLossScaler(device, **self.options.scaler_knobs)
            if self.options.scaler_state:  # a torch.amp.GradScaler's scale and growth tracker carry over
                self.scaler.load_state_dict(self.options.scaler_state)
            self._own_scaler = True
        elif scaler_device(self.scaler) != device:
            raise ValueError(
                f"AdaptiveMP: the scaler was built for device {scaler_device(self.scaler)!r} but the model runs"
                f" on {device!r}; pass AdaptiveLossScaler(device={device!r}, ...)."
            )
        if self.scaler.on_floor is None:
            self.scaler.on_floor = _escalate_in_core
        if self.options.sharded_gradients:  # never unset what a user set on their own scaler
            self.scaler.sharded_gradients = True

    def setup(self, model: nn.Module, record_order: bool = True) -> None:
        """Take the model (its device resolves ``"auto"``), apply the fp32 islands, record execution order."""
        if self.device is None or self.precision == "auto":
            param = next(model.parameters(), None)
            self.resolve(self.device or (param.device.type if param is not None else "cpu"))
        self.model = model
        self.buffers.watch(model)
        self._batch_due = True  # a new fit: what an earlier one kept of its last batch is stale
        self.rerun_state.clear()
        self.fallback.setup(model, self.precision, self.device)
        if record_order:
            self.tracker.order.record(model)  # removed after the first optimizer step (or at teardown)

    def teardown(self) -> None:
        """Remove every hook we may still hold (an interrupted run, or a run with no optimizer step)."""
        self.replay.clear()  # the last batch is the user's, not ours to keep alive
        self._observed = None
        self._clean_losses.clear()
        self.tracker.stop()
        self.collect_statistics()

    # ------------------------------------------------------------------------------ forward, backward
    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the precision in force. Before setup (no device yet) it is what the
        precision means on the CPU, without deciding anything: setup still resolves for the model's device."""
        device = self.device or "cpu"
        precision = resolve_auto_precision(device) if self.precision == "auto" else self.precision
        return autocast(device, precision)

    def training_context(self) -> contextlib.AbstractContextManager:
        """The context of a training micro-step's forward: autocast, and eager execution of compiled code while
        statistics or attribution hooks are armed (compiled code would not run them; see ``hooks.eager``)."""
        if not (self.statistics.active or self.tracker.hooked):
            return self.autocast()
        stack = contextlib.ExitStack()
        stack.enter_context(eager())
        stack.enter_context(self.autocast())
        return stack

    @property
    def rescue_enabled(self) -> bool:
        """Whether an fp16 step that overflows in the backward is re-run at a lower scale (see ``rescue``)."""
        if self.scaler is None or not self.scaler.is_enabled() or self._rescue_option is False:
            return False
        return self._rescue_option or self.scaler.config.policy == "predictive"

    def start_micro_step(self) -> None:
        self._begin_batch_if_due()
        if self._rerunning:
            return  # the same micro-batch again (a rescue): counted once; a sample's hooks are still armed
        self._micro_batches += 1
        self.tracker.start_micro_step()
        calibrating = self.scaler is not None and self.scaler.is_enabled() and self.scaler.policy.calibrating
        steps = self.ledger.optimizer_steps
        # With the default cadence the first step samples too: a short run's report still has figures.
        first = steps == 1 and self.options.stats_every is None and not self.statistics.samples_taken
        if self.model is not None and (steps % self.stats_every == 0 or calibrating or first):
            # A sampled step: hooks live for this step only. The predictive scaler also wants the gradients
            # inside the backward (its growth limit), and a calibrating one wants them before its first step.
            wants_grads = self.scaler is not None and (calibrating or self.scaler.config.policy == "predictive")
            self.statistics.start(self.model, output_grads=wants_grads)

    def observe_input(self, batch: Any) -> None:
        """Keep a reference to a batch for attribution (the Fabric shell; the Trainer's goes through
        ``keep_micro_batch``). Fabric converts the input before it enters the step context."""
        self._begin_batch_if_due()
        self.tracker.observe_input(batch)

    def _begin_batch_if_due(self) -> None:
        """The first micro-batch of an optimizer step, before its forward: a new batch for attribution, and a
        snapshot of the buffers a skipped step puts back."""
        if self._batch_due:
            self._batch_due = False
            self._observed = None
            self.tracker.new_batch()
            self.buffers.take()
            self.replay.begin_batch(self.device)
            self._backward_passes = 0
            self._micro_batches, self._batch_stepped = 0, False
            self._rescue_passes, self._nonfinite_unscaled = 0, False
            if self.model is not None and self.rescue_enabled:
                self.rerun_state.take(self.model)

    def keep_micro_batch(self, run: Callable[[Callable[[Tensor], None]], None], batch: Any = None) -> None:
        """Register how to run the current micro-batch again (see ``StepReplay``) and observe its ``batch``
        (``observe_input``): called by the shell as each micro-batch's step starts. Keeps references only."""
        self._begin_batch_if_due()
        self.replay.keep(run)
        if batch is not self._observed:  # LBFGS and a rescue run the same micro-batch again: observed once
            self._observed = batch
            self.tracker.observe_input(batch)

    def scale_loss(self, loss: Tensor) -> Tensor:
        self._backward_passes += 1
        self.tracker.observe_loss(loss)
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def run_closure(self, closure: Callable[[], Any], training: bool = True) -> Any:
        """Run the closure; a low-precision kernel failure promotes its module to fp32 and retries.

        ``training=False`` (an evaluation forward) leaves the buffers alone: nothing to undo there.
        """
        while True:
            try:
                if training and not self._rerunning and self.rerun_state.watch_next and self.rescue_enabled:
                    return self._run_watched(closure)
                return closure()
            except (RuntimeError, NotImplementedError) as error:
                if not self.promote_after_kernel_error(error):
                    raise
                # The failed forward may have updated BatchNorm: undo it, unless that would also undo the clean
                # micro-batches before it in an accumulated step.
                if training and self._micro_batches == 1:
                    self.buffers.restore()

    def _run_watched(self, closure: Callable[[], Any]) -> Any:
        """The first step's closure, under a write watch: what ``training_step`` writes in place (an EMA
        teacher) is copied at the start of every later step, so that a rescue re-runs it from there."""
        self.rerun_state.watch_next = False
        watch = WriteWatch(self.model.named_parameters()) if self.model is not None else None
        if watch is None:
            return closure()
        with watch:
            result = closure()
        self.rerun_state.learn(watch.written)
        return result

    def promote_after_kernel_error(self, error: BaseException) -> bool:
        """Promote the module whose low-precision kernel raised ``error``; False when that is not the case."""
        if not (self.options.auto_fallback and self.autocast_dtype is not None and is_kernel_error(error)):
            return False
        fqn = module_from_traceback(error, self.model) if self.model is not None else None
        detail = first_line(error)
        step = self.ledger.optimizer_steps
        if fqn is None or not self.fallback.promote(self.model, fqn, "kernel error", self.device, step, detail):
            return False
        rank_zero_warn(f"AdaptiveMP: {fqn} runs in fp32 from now on: its {self.precision} kernel failed ({detail}).")
        return True

    # ------------------------------------------------------------------------------------------- step
    def start_step(self) -> None:
        """Count one optimizer step, before its closure runs."""
        self.ledger.start_step()

    def unscale(self, optimizer: Optimizer, handles_unscaling: bool = False, rerun: Any = None) -> None:
        """After backward: unscale (fp16, unless the optimizer does it in ``step``), then sample statistics.

        Unscaling comes first so that statistics, ``on_before_optimizer_step`` and clipping see true gradients.
        ``rerun(runs)`` runs the step's forward, zero_grad and backward again, logging muted: one micro-batch
        through Lightning's closure, or each of ``runs`` (the kept micro-batches, see ``StepReplay``) for an
        accumulated step. Given it, an fp16 overflow born in the backward is rescued (see ``_rescue``).
        """
        if self.scaler is not None:
            # An accumulated step is re-run micro-batch by micro-batch, from the kept runs; not across ranks,
            # where each micro-batch but the last would need the strategy's no-sync context again.
            accumulated_ok = len(self.replay.kept) == self._micro_batches and not distributed()
            can_rescue = (
                rerun is not None
                and self.rescue_enabled
                and (self._micro_batches == 1 or accumulated_ok)
                and not self.replay.active
            )
            # Growth may go closer to the edge only where an overflow costs a re-run, not a batch.
            self.scaler.policy.rescuing = can_rescue
            # A fused optimizer unscales inside step(); to rescue it, unscale here instead (its step then takes
            # found_inf and no scale, as GradScaler arranges): the verdict is on the host before step(), the
            # one read a rescue needs. Without rescue it reads nothing, as GradScaler's fused path.
            if not handles_unscaling or can_rescue:
                self.scaler.unscale_(optimizer)
                if can_rescue:
                    self._rescue(optimizer, rerun)
        self.collect_statistics()  # before clipping: the statistics describe what the backward produced

    def _rescue(self, optimizer: Optimizer, rerun: Callable[[list[Any]], Any]) -> None:
        """fp16: when this step's gradients overflowed in the backward, re-run its forward/backward on the same
        batch at a lower scale instead of skipping it (called by ``unscale``, after ``unscale_``).

        Applies to a step of one micro-batch whose inputs and loss are finite (the overflow was born in the
        backward) while the scale is above its floor; anything else is skipped as before. The first re-run uses
        the scale the policy chooses; if that overflows too, the last one runs without loss scaling (scale 1,
        or the floor if higher). Still non-finite there, the gradient is non-finite at any useful scale: the
        policy's state from before this step is put back and the skipped step is excused (a backward NaN is
        not the scale's fault; repeated, it is blamed on its module like a forward overflow).

        Before a re-run, BatchNorm statistics and the RNG are put back where the batch began, so the rescued
        step is the step a run at the lower scale would have taken, dropout included; the overflowed attempt's
        statistics are dropped (a sampled step's hooks measure the re-run).
        """
        policy = self.scaler.policy
        before: dict[str, Any] | None = None
        while self.scaler.overflowed(optimizer):
            if self._rescue_passes == RESCUE_ATTEMPTS:
                self._nonfinite_unscaled = True
                rescues = policy.rescues
                policy.load_state_dict(before)  # undo this step's back-offs: they could not have helped
                policy.rescues = rescues
                return
            if self.scaler.get_scale() <= self.scaler.config.floor or not self.tracker.forward_finite():
                return  # the floor rule, or a bad batch / forward overflow: skip, attribute and record as usual
            before = before or policy.state_dict()
            self._rescue_passes += 1
            self.scaler.rescue(last=self._rescue_passes == RESCUE_ATTEMPTS)
            self.statistics.discard()
            self.buffers.restore()
            runs = self.replay.kept
            accumulated = self._micro_batches > 1
            self.replay.restart_batch(keep_runs=accumulated)
            self.tracker.forget_losses()
            self._backward_passes = 0
            self.rerun_state.before_rerun(self.model)
            watch = WriteWatch(self.model.named_parameters())
            self._rerunning = True
            try:
                with watch:
                    self.run_closure(functools.partial(rerun, runs if accumulated else []))
            finally:
                self._rerunning = False
            self._note_rerun_writes(self.rerun_state.after_rerun(watch))
            self.scaler.unscale_(optimizer)

    def _note_rerun_writes(self, names: list[str]) -> None:
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            rank_zero_warn(
                f"AdaptiveMP: training_step writes {shown} in place (an EMA teacher?). A rescue ran the step again"
                " and they were put back as one run leaves them, but this re-run read them after a second write."
                " From now on they are copied when each step begins, so later rescues start exactly where the"
                " step did."
            )

    def step(self, optimizer: Optimizer, **kwargs: Any) -> tuple[bool, Any]:
        """Step, or skip a step whose gradients are not finite; then attribute, decide and record.

        Returns:
            ``(skipped, what optimizer.step returned)``.
        """
        repeat = self.tracker.note_optimizer(id(optimizer))  # another optimizer already skipped on this batch
        spike = self._loss_spike(optimizer)
        if spike is not None:
            if self.scaler is not None:
                self.scaler.update()  # the gradients were finite: the scale sees a clean iteration
            self.ledger.guard_skipped += 1
            finding = Finding("loss", None, "spike", "float32")
            self._decide(optimizer, finding, repeat=repeat, action=_spike_action(spike))
            return True, None
        if self.scaler is not None:
            skipped_before = self.scaler.skipped_steps
            output = self.scaler.step(optimizer, **kwargs)  # skips optimizer.step() on non-finite gradients
            finding = self._attribute() if self.scaler.skipped_steps > skipped_before else None
            if finding is not None and (finding.phase != "backward" or self._nonfinite_unscaled):
                # Lowering the scale cannot fix a bad batch, a forward overflow, or a gradient that is
                # non-finite without scaling (a rescue's last re-run showed it).
                self.scaler.excuse_overflow()
            self.scaler.update()
        elif self._guard_finds_nonfinite(optimizer):  # bf16/fp32: after clipping
            self.ledger.guard_skipped += 1
            output, finding = None, self._attribute()
        else:
            output, finding = optimizer.step(**kwargs), None
        self._decide(optimizer, finding, repeat=finding is not None and repeat)
        return finding is not None, output

    def gradients_nonfinite(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer``'s gradients of this step hold an inf or NaN, asked before ``step`` (Fabric's
        clipping, which raises on a non-finite norm). fp16 reads the flags on the sync ``step`` makes anyway;
        bf16/fp32 run the guard now and ``step`` takes its answer instead of asking again."""
        if self.scaler is not None:
            return self.scaler.overflowed(optimizer)
        if not self.options.guard_nonfinite:
            return False
        found = self._verdicts[id(optimizer)] = self.guard(optimizer, self.options.sharded_gradients)
        return found

    def _guard_finds_nonfinite(self, optimizer: Optimizer) -> bool:
        verdict = self._verdicts.pop(id(optimizer), None)
        if verdict is not None:
            return verdict
        return self.options.guard_nonfinite and self.guard(optimizer, self.options.sharded_gradients)

    def end_step(self) -> None:
        self._verdicts.clear()
        self.tracker.end_step()
        if self.scaler is not None:
            self.scales.record(self.ledger.optimizer_steps, self.scaler.get_scale())  # a host float: no sync
        self._batch_due = True

    def collect_statistics(self) -> None:
        """Fold a sampled step's statistics in (after unscaling); nothing on other steps."""
        if self.statistics.active and self.model is not None:
            scale = self.scaler.get_scale() if self.scaler is not None else 1.0
            self.statistics.collect(self.model, scale, self.stats_dtype)
            if self.scaler is not None and self.statistics.backward_amax is not None:
                # Activation gradients are each rank's own: agree on the largest, or ranks would pick scales.
                value = self.statistics.backward_amax
                (value,) = all_reduce([math.inf if math.isnan(value) else value], "MAX")
                self.scaler.observe_backward_amax(value)

    def _replay(self, expected: str) -> tuple[bool, Finding | None]:
        """Run the bad step again under the tracer (the tracker calls this): (ran, its finding or None)."""
        passes = self._backward_passes
        if self.model is None or not self.replay.ready or passes == 0:
            return False, None
        if is_sharded(self.model.parameters()):
            return False, None  # FSDP2 / tensor parallel: a replayed forward/backward would run collectives again
        scale = self.scaler.get_scale() if self.scaler is not None else None
        try:
            found = self.replay.replay(self.model, self.buffers.restore, self.autocast(), scale, passes)
        except Exception as error:  # a replay must never break training: fall back to the cheap attribution
            rank_zero_warn(f"AdaptiveMP: could not replay the bad step to locate it ({first_line(error)}).")
            return True, None
        if self.rescue_enabled:
            self.rerun_state.learn(self.replay.written)
        return True, found

    def _attribute(self) -> Finding:
        if self.model is None:
            return Finding("backward", None, "nan", "unknown")
        return self.tracker.attribute(self.model)

    def _decide(self, optimizer: Optimizer, finding: Finding | None, repeat: bool = False, action: str = "") -> None:
        """After a step: promote a repeatedly blamed module, climb the ladder if due, record the event.

        ``repeat``: the batch was already attributed for another optimizer (manual optimization); its step is
        skipped too, but the bad batch is one event, already recorded. ``action``: the event's display text when
        the typed fields cannot say it (a loss spike); built from them otherwise.
        """
        self._last_step_skipped[id(optimizer)] = self._last_skipped = finding is not None
        if finding is None:
            self._batch_stepped = True
            self._clean_losses.append(self.tracker.losses)
            if self._rescue_passes:
                self.ledger.rescued_steps += 1
        elif not self._batch_stepped:
            # "Skipped" means nothing changed, BatchNorm statistics included. Once another optimizer has stepped
            # cleanly on this batch (a GAN's generator), its forward's buffer updates stay with that step.
            self.buffers.restore()
        scaler_action = self.scaler.last_action if self.scaler is not None else None
        at_floor = scaler_action is ScaleAction.FLOOR and self.scaler.on_floor is _escalate_in_core
        if repeat:
            self._floor_pending |= at_floor  # climbed with the next recorded event
            return
        at_floor, self._floor_pending = at_floor or self._floor_pending, False
        why = self.ladder.observe(finding is not None, at_floor)
        if finding is None:
            return
        promoted = self._promote_blamed(finding)
        scale = self.scaler.get_scale() if self.scaler is not None else None  # before a switch to bf16 drops it
        escalation = self._escalate(why, finding.module or self.ledger.last_blamed_module()) if why else None
        if promoted is not None or (escalation is not None and escalation.rung is Rung.PROMOTE):
            self._open_probation()
        self.ledger.record(
            finding,
            scale,
            scaler_action=scaler_action,
            promoted=promoted,
            promoted_scope=self.fallback.promotions[promoted].scope if promoted is not None else None,
            escalation=escalation.rung if escalation is not None else None,
            escalated_module=escalation.module if escalation is not None else None,
            action=action,
        )
        if escalation is not None and escalation.rung is Rung.GIVE_UP:
            raise LossScaleFloorError(give_up_message(escalation.reason, self.ledger.events[-5:]))

    # --------------------------------------------------------------------------- the spike rule (top)
    def _open_probation(self) -> None:
        """A module was just promoted: judge the next ``promote_window`` steps' losses against the recent ones."""
        losses = [_loss_magnitude(step) for step in self._clean_losses if step]
        losses = [v for v in losses if math.isfinite(v)]
        if not losses:
            return  # nothing to compare with (a promotion on the first steps)
        self._loss_reference = median(losses)
        self._probation_until = self.ledger.optimizer_steps + self.options.promote_window

    def _loss_spike(self, optimizer: Optimizer) -> float | None:
        """On probation after a promotion: this step's loss over the reference when it is finite but more than
        SPIKE_FACTOR times it (a spike), else None."""
        if self.ledger.optimizer_steps > self._probation_until or self._loss_reference is None:
            return None
        if self.scaler is not None and optimizer_handles_unscaling(optimizer):
            return None  # a fused optimizer unscales inside step(): there is no point to skip it cleanly
        losses = self.tracker.losses
        if not losses:
            return None
        value = _loss_magnitude(losses)  # the one host read
        reference = max(self._loss_reference, 1e-12)
        return value / reference if math.isfinite(value) and value > SPIKE_FACTOR * reference else None

    def _promote_blamed(self, finding: Finding) -> str | None:
        """Blame layers, never bad batches or bad losses; a backward overflow only when scaling cannot help."""
        if not self.options.auto_fallback or finding.module is None or finding.phase in ("input", "loss"):
            return None
        scaling_can_help = (
            self.scaler is not None
            and self.scaler.get_scale() > self.scaler.config.floor
            and not self._nonfinite_unscaled
        )
        if finding.phase == "backward" and scaling_can_help:
            return None
        step = self.ledger.optimizer_steps
        if not self.fallback.rule.blame(finding.module, step):
            return None
        # Promote what the evidence points to: the module running the operation that overflowed. A leaf holds
        # it; a module with submodules ran it in its own code, so only that code goes to fp32.
        scope = "own_code" if self._has_children(finding.module) else "module"
        if not self.fallback.promote(self.model, finding.module, "overflow", self.device, step, finding.phase, scope):
            return None
        rank_zero_warn(promotion_message(finding, self.precision, scope))
        return finding.module

    def _has_children(self, fqn: str) -> bool:
        try:
            module = self.model.get_submodule(fqn) if self.model is not None else None
        except AttributeError:  # a name from another model (a resumed checkpoint)
            return False
        return module is not None and next(module.children(), None) is not None

    def _escalate(self, why: str, blamed: str | None) -> Escalation:
        """Take the first rung of the ladder that applies (``GIVE_UP`` is raised by the caller)."""
        if self.scaler is not None:
            self.scaler.policy.acknowledge_floor()
        names = [fqn for fqn, _ in self.model.named_modules() if fqn] if self.model is not None else []
        can_switch = self.precision == "16-mixed" and resolve_auto_precision(self.device) == "bf16-mixed"
        for candidate in self.ladder.candidates(why, blamed, self.fallback.promotions, names, can_switch):
            if candidate.rung is Rung.PROMOTE:
                step = self.ledger.optimizer_steps
                if self.fallback.promote(self.model, candidate.module, "escalation", self.device, step, why):
                    rank_zero_warn(f"AdaptiveMP escalation: {why}; {candidate.module} runs in fp32 from now on.")
                    return candidate
                continue
            if candidate.rung is Rung.SWITCH_TO_BF16:
                rank_zero_warn(f"AdaptiveMP escalation: {why}; switching from fp16 to bf16 (same range as fp32).")
                self.switch_to_bf16()
            return candidate
        raise AssertionError("the ladder always ends with GIVE_UP")

    def switch_to_bf16(self) -> None:
        if self.scaler is not None:
            self.ledger.guard_skipped += self.scaler.skipped_steps  # keep the count; the scaler goes away
        self.scaler = None
        self.precision = "bf16-mixed"
        self.switched_to_bf16 = True

    # ------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "switched_to_bf16": self.switched_to_bf16,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "promotions": self.fallback.state_dict(),
            "ladder": self.ladder.state_dict(),
            "scale_history": self.scales.state_dict(),
            **self.ledger.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore after setup and before the first new step, so promotions apply to the first forward."""
        saved = state_dict.get("precision")
        if state_dict.get("switched_to_bf16") and self.precision == "16-mixed":
            self.switch_to_bf16()  # the ladder moved the run to bf16; stay there
        if saved not in (None, self.precision):
            rank_zero_warn(
                f"Resuming a {saved!r} checkpoint with AdaptiveMP(precision={self.precision!r}): the saved"
                " loss-scaler state does not apply and is ignored; counters and promotions are kept."
            )
        self.ledger.load_state_dict(state_dict)
        self.ladder.load_state_dict(state_dict.get("ladder", {}))
        self.scales.load_state_dict(state_dict.get("scale_history", {}))
        scaler_state = state_dict.get("scaler")
        if self.scaler is not None and scaler_state and saved == self.precision:
            self.scaler.load_state_dict(scaler_state)
        if self.model is not None:
            self.fallback.load_state_dict(self.model, state_dict.get("promotions", ()), self.device)


def promotion_message(finding: Finding, precision: str, scope: str) -> str:
    """The warning of a promotion for repeated overflows, with where they were born when a replay said so."""
    where = f" at {finding.op}" + (f" ({finding.source})" if finding.source else "") if finding.op else ""
    if scope == "module":
        return f"AdaptiveMP: {finding.module} runs in fp32 from now on: repeated {finding.phase} overflows{where}."
    low = {"16-mixed": "fp16", "bf16-mixed": "bf16"}.get(precision, precision)
    return (
        f"AdaptiveMP: {finding.module}'s own code runs in fp32 from now on (its submodules keep {low}): repeated"
        f" {finding.phase} overflows{where} in its forward. To narrow it to the lines that overflow, run them"
        " with `with lightning_mp.fp32(): ...` (cast their inputs with .float()) instead."
    )


def _loss_magnitude(losses: list[Tensor]) -> float:
    """Mean magnitude of a step's losses (one per backward pass), read on the host."""
    return float(torch.stack([t.float().abs().mean() for t in losses]).mean())


def _spike_action(ratio: float) -> str:
    return (
        f"skipped as a loss spike: finite, but {ratio:.3g}x the median loss before the last"
        f" promotion (more than {SPIKE_FACTOR:g}x within promote_window steps of a promotion)"
    )


def _escalate_in_core(scaler: AdaptiveLossScaler) -> None:
    """The scaler's ``on_floor`` while the core owns it: nothing here (we are inside ``update()``); the core
    reads ``ScaleAction.FLOOR`` afterwards and climbs its escalation ladder with the step's event."""


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
