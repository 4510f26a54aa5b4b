"""``PrecisionCore``: one run's precision state and the optimizer step, in order, without Lightning.

The shells (``plugin.py`` for the Trainer, ``fabric.py``, ``fsdp.py``) adapt their framework's hooks to four
calls and hold no knowledge of the order: ``micro_batch()`` around each micro-batch's forward, ``scale_loss``
before each backward, ``optimizer_step`` (or ``fabric_step``) for the step, ``state_dict`` for checkpoints. The
step runs, in this order::

    begin     the step opens at its first micro-batch (``Batch.begin_if_due``: copies what a skip puts back)
    autocast  each micro-batch's forward under the format's autocast (``micro_batch``)
    scale     each backward of the scaled loss (``scale_loss``; fp16 only)
    closure   Lightning's closure, if any: a low-precision kernel that raises promotes its module and retries
    unscale   true gradients for statistics, ``on_before_optimizer_step`` and clipping (``Stepper.unscale``)
    rescue    an fp16 overflow born in the backward runs the batch again at a lower scale (``scaling.rescue``)
    guard     step, or skip a step whose gradients are not finite (``Stepper.step``)
    attribute where a skipped step went non-finite: cheap flags, then a replay (``diagnosis``)
    promote   the module the evidence names, on repeated blame (``fallback.promotion``)
    escalate  climb the ladder when skipping gets nowhere (``fallback.escalation``)
    record    the event, the counts, the scale history (``reporting``)

Each collaborator has one job and lives in its folder; the core wires them and reads its format
(``formats``) instead of branching on the precision.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp._compat import scaler_device
from lightning_mp._grads import all_reduce, distributed, is_sharded
from lightning_mp.diagnosis.attribution import Finding, OverflowTracker, is_kernel_error, module_from_traceback
from lightning_mp.diagnosis.hooks import eager
from lightning_mp.diagnosis.replay import StepReplay
from lightning_mp.diagnosis.statistics import Cadence, ModuleStatistics
from lightning_mp.fallback.escalation import Escalation, EscalationLadder, Rung, give_up_message
from lightning_mp.fallback.promotion import FallbackManager, Promotion, Reason, SpikeRule, promotion_message
from lightning_mp.formats import Format, default_device, format_of, resolve_auto_precision
from lightning_mp.options import PluginOptions
from lightning_mp.reporting.history import ScaleHistory
from lightning_mp.reporting.ledger import RunLedger
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError
from lightning_mp.scaling.rescue import Rescue
from lightning_mp.scaling.stepper import GuardedStep, ScaledStep
from lightning_mp.step.batch import Batch
from lightning_mp.step.buffers import BufferSnapshot
from lightning_mp.step.side_effects import RerunState, WriteWatch

__all__ = ["PrecisionCore", "StepOutcome", "first_line"]


class StepOutcome(NamedTuple):
    """What ``optimizer_step`` returns: the closure's result (a rescue's re-run replaces it), what
    ``optimizer.step`` (or the scaler's step) returned, and whether a step was taken or skipped at all (an
    automatic-optimization ``training_step`` that returned ``None`` ran no backward: nothing to step)."""

    closure_result: Any
    output: Any
    stepped: bool


class PrecisionCore:
    """The precision state of one run and the decisions taken on it, driven one optimizer step at a time.

    Args:
        options: the validated knobs (see :class:`~lightning_mp.options.PluginOptions`).
        warn: how to tell the user something (the shells give their framework's rank-zero warning).
    """

    def __init__(self, options: PluginOptions, warn: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.warn = warn or _warn
        self.precision = options.precision  # "auto" until the device is known
        self.device = options.device_type
        sharded = options.sharded_gradients  # FSDP1: no replay or re-run (they would run collectives again)
        self.tracker = OverflowTracker(options.watch_steps)
        self.replay = StepReplay()
        self.replay.enabled = options.replay and not sharded
        self.rescue = Rescue(False if sharded else options.rescue)
        self.replay.save_rng = self.rescue.option is not False  # a re-run draws the same dropout masks
        self.statistics = ModuleStatistics(options.stats)
        self.cadence = Cadence(options.stats_every)
        self.buffers = BufferSnapshot()  # what a skipped step puts back (BatchNorm statistics)
        self.rerun_state = RerunState()  # a re-run starts from the step's own start (an EMA teacher, a counter)
        self.batch = Batch(self.tracker, self.replay, self.buffers, self.statistics, self.rerun_state)
        self.fallback = FallbackManager(
            options.fp32_modules, options.fp32_defaults, options.promote_after, options.promote_window
        )
        self.spikes = SpikeRule(options.promote_window)
        self.ladder = EscalationLadder(options.max_consecutive_skips)
        self.ledger = RunLedger(options.max_events)
        self.scales = ScaleHistory()  # the loss scale after every optimizer step (fp16), for the report's plot
        self.model: nn.Module | None = None
        self.switched_to_bf16 = False
        self._step_open = False  # an optimizer step has begun (counted) and not ended
        self._unscaled: set[int] = set()  # id(optimizer): unscaled in this step
        self._last_skipped: dict[int | None, bool] = {}  # id(optimizer) (None: any) -> its last step skipped
        self._floor_pending = False  # the scale reached its floor on a step whose event was already recorded
        user_scaler = options.scaler if isinstance(options.scaler, AdaptiveLossScaler) else None
        self._scaler_at_start = user_scaler.state_dict() if user_scaler is not None else None  # see restart()
        self.format: Format | None = None
        self.stepper: GuardedStep | ScaledStep = GuardedStep(options.guard_nonfinite, sharded)
        if self.precision != "auto":
            self._use(format_of(self.precision), self.device or default_device())
        if self.device is not None:
            self.resolve(self.device)

    # ------------------------------------------------------------------------------------------ setup
    def _use(self, fmt: Format, device: str) -> None:
        """Take ``fmt`` as the format in force, with its way of stepping on ``device``."""
        self.format, self.precision = fmt, fmt.name
        if not fmt.scaled:
            if not isinstance(self.stepper, GuardedStep):
                self.stepper = GuardedStep(self.options.guard_nonfinite, self.options.sharded_gradients)
            return
        scaler = self.stepper.scaler
        if isinstance(self.options.scaler, AdaptiveLossScaler):
            scaler = self.options.scaler  # the user's: theirs to build for the right device
        elif scaler is None or scaler_device(scaler) != device:
            scaler = AdaptiveLossScaler(device, **self.options.scaler_knobs)
            if self.options.scaler_state:  # a torch.amp.GradScaler's scale and growth tracker carry over
                scaler.load_state_dict(self.options.scaler_state)
        escalates = scaler.on_floor is None or getattr(self.stepper, "escalates", False)
        if escalates:  # the core climbs its ladder at the floor; a user's own on_floor is theirs
            scaler.on_floor = _floor_noted
        if self.options.sharded_gradients:  # never unset what a user set on their own scaler
            scaler.sharded_gradients = True
        self.stepper = ScaledStep(scaler, escalates)

    def resolve(self, device: str | None) -> None:
        """Fix the format and its stepper once the device is known (``"auto"`` is decided here)."""
        if device is None:
            return
        self.device = device
        if self.options.precision == "auto" and self.format is None:
            fmt = format_of(resolve_auto_precision(device))
            if self.options.scaler is not None and not fmt.scaled:
                self.warn(f"AdaptiveMP(precision='auto') resolved to {fmt.name!r}: the scaler is unused.")
            self._use(fmt, device)
            return
        if self.format is not None:
            self._use(self.format, device)
        scaler = self.stepper.scaler
        if scaler is not None and scaler_device(scaler) != device:
            raise ValueError(
                f"AdaptiveMP: the scaler was built for device {scaler_device(scaler)!r} but the model runs"
                f" on {device!r}; pass AdaptiveLossScaler(device={device!r}, ...)."
            )

    def setup(self, model: nn.Module, record_order: bool = True) -> None:
        """Take the model (its device resolves ``"auto"``), apply the fp32 islands, record execution order."""
        if self.device is None or self.format is None:
            param = next(model.parameters(), None)
            self.resolve(self.device or (param.device.type if param is not None else "cpu"))
        self.model = model
        self.buffers.watch(model)
        self.batch.end()  # a new fit: what an earlier one kept of its last batch is stale
        self.rerun_state.clear()
        self.fallback.setup(model, self.format.fp32_defaults, self.device)
        if record_order:
            self.tracker.order.record(model)  # removed after the first optimizer step (or at teardown)

    def restart(self) -> PrecisionCore:
        """A core for a new fit with the same options: counts, events, promotions, the scale and its history,
        and everything learned start afresh, as they did for the first fit; a scaler the user passed is put
        back to its state at construction. (A resumed fit then restores them from its checkpoint.)"""
        if self._scaler_at_start is not None:
            self.options.scaler.load_state_dict(self._scaler_at_start)
        return PrecisionCore(self.options, self.warn)

    def teardown(self) -> None:
        """Remove every hook we may still hold (an interrupted run, or a run with no optimizer step)."""
        self.batch.forget()  # the last batch is the user's, not ours to keep alive
        self.spikes.clear()
        self.tracker.stop()
        self.collect_statistics()

    # ------------------------------------------------------------------------------------- what it reads
    @property
    def scaler(self) -> AdaptiveLossScaler | None:
        return self.stepper.scaler

    @scaler.setter
    def scaler(self, scaler: AdaptiveLossScaler) -> None:
        """Replace the loss scaler of a scaled format (what ``plugin.scaler = ...`` does)."""
        if self.format is None or not self.format.scaled:
            raise ValueError(f"AdaptiveMP(precision={self.precision!r}) has no loss scaler to replace.")
        self.stepper = ScaledStep(scaler, escalates=getattr(self.stepper, "escalates", True))

    @property
    def autocast_dtype(self) -> Any:
        return self.format.autocast_dtype if self.format is not None else None

    @property
    def stats_dtype(self) -> Any:
        return self.format.stats_dtype if self.format is not None else format_of("32-true").stats_dtype

    @property
    def stats_every(self) -> int:
        """Statistics are sampled on one optimizer step in this many (the format's default unless set)."""
        return self.cadence.every(self.format.stats_every if self.format is not None else 100)

    @property
    def skipped_steps(self) -> int:
        return self.ledger.skipped_steps

    @property
    def rescue_enabled(self) -> bool:
        return self.rescue.enabled(self.scaler)

    def step_was_skipped(self, optimizer: Optimizer | None = None) -> bool:
        """Whether the last step of ``optimizer`` (``None``: of any optimizer) was skipped."""
        return self._last_skipped.get(id(optimizer) if optimizer is not None else None, False)

    # ---------------------------------------------------------------------------------- micro-batches
    def autocast(self) -> contextlib.AbstractContextManager:
        """The format's autocast; before setup, what the precision means on the CPU (setup still decides)."""
        device = self.device or "cpu"
        fmt = self.format or format_of(resolve_auto_precision(device))
        return fmt.autocast(device)

    def _open_step(self) -> None:
        """An optimizer step begins (at its first micro-batch, or at the step itself): count it once."""
        if not self._step_open:
            self._step_open = True
            self.ledger.start_step()

    def _begin(self) -> None:
        """A micro-batch is about to run: the first of a batch begins it, and the step opens."""
        self.batch.begin_if_due(self.model, self.device, self.rescue_enabled)
        self._open_step()

    def begin_micro_batch(self) -> None:
        """A training micro-batch's forward begins: the step opens and a sampled step's hooks are armed."""
        self._begin()
        if self.batch.start_micro_batch() and self.model is not None:
            default = self.format.stats_every if self.format is not None else 100
            calibrating = self.stepper.calibrating
            if self.cadence.due(self.ledger.optimizer_steps, default, self.statistics.samples_taken, calibrating):
                self.statistics.start(self.model, output_grads=self.stepper.wants_backward_amax())

    @contextlib.contextmanager
    def micro_batch(self) -> Generator[None, None, None]:
        """Around a training micro-batch's forward: ``begin_micro_batch``, then the ``training_context``."""
        self.begin_micro_batch()
        with self.training_context():
            yield

    def training_context(self) -> contextlib.AbstractContextManager:
        """Autocast, and eager execution of compiled code while statistics or attribution hooks are armed
        (compiled code would not run them; see ``hooks.eager``)."""
        if not (self.statistics.active or self.tracker.hooked):
            return self.autocast()
        stack = contextlib.ExitStack()
        stack.enter_context(eager())
        stack.enter_context(self.autocast())
        return stack

    @property
    def step_open(self) -> bool:
        """An optimizer step has begun and not ended."""
        return self._step_open

    def keep_micro_batch(self, run: Callable[[Callable[[Tensor], None]], None], batch: Any = None) -> None:
        """Keep how to run the current micro-batch again (a replay, a rescue) and observe its input."""
        self._begin()
        self.batch.keep(run, batch)

    def observe_input(self, batch: Any) -> None:
        """Observe a micro-batch's input for attribution (Fabric, whose inputs arrive before the forward)."""
        self._begin()
        self.batch.observe(batch)

    def scale_loss(self, loss: Tensor) -> Tensor:
        self._open_step()
        self.batch.backward(loss)
        return self.stepper.scale_loss(loss)

    def run_closure(self, closure: Callable[[], Any], training: bool = True) -> Any:
        """Run the closure; a low-precision kernel failure promotes its module to fp32 and retries.

        ``training=False`` (an evaluation forward) leaves the buffers alone: nothing to undo there.
        """
        while True:
            try:
                if training and self.rerun_state.watch_next and self.rescue_enabled and not self.batch.rerunning:
                    return self._run_watched(closure)
                return closure()
            except (RuntimeError, NotImplementedError) as error:
                if not self.promote_after_kernel_error(error):
                    raise
                # The failed forward may have updated BatchNorm: undo it, unless that would also undo the clean
                # micro-batches before it in an accumulated step.
                if training and self.batch.micro_batches == 1:
                    self.buffers.restore()

    def _run_watched(self, closure: Callable[[], Any]) -> Any:
        """The first step's closure under a write watch: what ``training_step`` writes in place (an EMA
        teacher) is copied at the start of every later step, so that a rescue re-runs it from there."""
        self.rerun_state.watch_next = False
        if self.model is None:
            return closure()
        watch = WriteWatch(self.model.named_parameters())
        with watch:
            result = closure()
        self.rerun_state.learn(watch.written)
        return result

    def promote_after_kernel_error(self, error: BaseException) -> bool:
        """Promote the module whose low-precision kernel raised ``error``; False when that is not the case."""
        if not (self.options.auto_fallback and self.autocast_dtype is not None and is_kernel_error(error)):
            return False
        fqn = module_from_traceback(error, self.model) if self.model is not None else None
        if fqn is None:
            return False
        # The error was raised in the innermost running module's own code: a leaf whole, a container's own code.
        scope = "own_code" if next(self.model.get_submodule(fqn).children(), None) is not None else "module"
        detail, step = first_line(error), self.ledger.optimizer_steps
        if not self.fallback.promote(self.model, fqn, Reason.KERNEL_ERROR, self.device, step, detail, scope):
            return False
        what = f"{fqn}'s own code" if scope == "own_code" else fqn
        self.warn(f"AdaptiveMP: {what} runs in fp32 from now on: its {self.precision} kernel failed ({detail}).")
        return True

    # ------------------------------------------------------------------------------------------ the step
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any] | None = None,
        *,
        automatic: bool = True,
        rerun: Callable[[list[Any]], Any] | None = None,
        before_update: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> StepOutcome:
        """One optimizer step, in order (see the module docstring).

        Args:
            closure: the forward and backward of the step's last micro-batch (Lightning's), if not run yet.
            automatic: the closure is automatic optimization's (a ``None`` result means no backward ran).
            rerun: runs the step again for a rescue: ``rerun([])`` the closure, ``rerun(runs)`` each kept
                micro-batch of an accumulated step; returns the closure's result.
            before_update: called with true gradients before the update (Lightning: ``on_before_optimizer_step``
                and clipping).
        """
        self._open_step()
        try:
            result = self.run_closure(closure) if closure is not None else None
            skip_backward = closure is not None and automatic and result is None
            if not skip_backward:
                rescued = self._unscale(optimizer, rerun if automatic else None)
                result = rescued if rescued is not None else result
            self.collect_statistics()  # before clipping: the statistics describe what the backward produced
            if before_update is not None:
                before_update()
            if skip_backward:
                return StepOutcome(result, None, stepped=False)
            return StepOutcome(result, self._step_or_skip(optimizer, kwargs), stepped=True)
        finally:
            self._end_step()

    def unguarded_step(self, step: Callable[[], Any]) -> Any:
        """A step the plugin cannot look inside (LBFGS re-evaluates its closure in ``step()``): counted and
        sampled, run as the framework runs it."""
        self._open_step()
        try:
            return step()
        finally:
            self.collect_statistics()
            self._end_step()

    def prepare_clipping(self, optimizer: Optimizer) -> bool:
        """Unscale for a clip before the step (Fabric); whether the gradients are non-finite (asked once)."""
        self._open_step()
        self._unscale(optimizer, None)
        self.collect_statistics()
        return self.stepper.nonfinite(optimizer)

    def _unscale(self, optimizer: Optimizer, rerun: Callable[[list[Any]], Any] | None) -> Any:
        """Unscale (once per step), rescuing an fp16 overflow born in the backward when ``rerun`` can; returns
        the last re-run's closure result, if any."""
        if id(optimizer) in self._unscaled:
            return None  # fabric.clip_gradients unscaled it already
        self._unscaled.add(id(optimizer))
        micro = self.batch.micro_batches
        accumulated_ok = len(self.replay.kept) == micro and not distributed()
        can_rescue = (
            rerun is not None
            and self.rescue_enabled
            and (micro == 1 or accumulated_ok)
            and not self.replay.active
            and self.model is not None
        )
        if self.scaler is not None:
            self.scaler.rescuing = can_rescue  # growth may go closer to the edge where an overflow costs a re-run
        self.stepper.unscale(optimizer, rescuing=can_rescue)
        if not can_rescue:
            return None
        results: list[Any] = []

        def run_again() -> None:
            self._note_rerun_writes(self.batch.rerun(self.model, self.run_closure, lambda r: results.append(rerun(r))))

        self.rescue.run(self.scaler, optimizer, self.tracker.forward_finite, run_again)
        return results[-1] if results else None

    def _note_rerun_writes(self, names: list[str]) -> None:
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            self.warn(
                f"AdaptiveMP: training_step writes {shown} in place (an EMA teacher?). A rescue ran the step again"
                " and they were put back as one run leaves them, but this re-run read them after a second write."
                " From now on they are copied when each step begins, so later rescues start exactly where the"
                " step did."
            )

    def _step_or_skip(self, optimizer: Optimizer, kwargs: dict[str, Any]) -> Any:
        """Step, or skip a step whose gradients are not finite (or whose loss is a spike); then decide."""
        repeat = self.tracker.note_optimizer(id(optimizer))  # another optimizer already skipped on this batch
        spike = self._spike(optimizer)
        if spike is not None:
            scale = self.stepper.scale
            self.stepper.skip()
            self._decide(optimizer, Finding.spike(), repeat, spike, scale=scale)
            return None
        scale = self.stepper.scale  # what this step's gradients carried; the settle below may move it
        skipped, output = self.stepper.step(optimizer, **kwargs)
        finding = self._diagnose() if skipped else None
        # Lowering the scale cannot fix a bad batch, a forward overflow, or a gradient non-finite without
        # scaling (a rescue's last re-run showed it).
        scale_related = finding is None or (finding.phase == "backward" and not self.rescue.nonfinite_unscaled)
        skipped |= self.stepper.settle(scale_related)  # a fused optimizer's own skip is known only now
        self._decide(optimizer, finding, repeat and finding is not None, skipped=skipped, scale=scale)
        return output

    def _spike(self, optimizer: Optimizer) -> float | None:
        if not self.stepper.can_skip_before_step(optimizer):
            return None
        return self.spikes.ratio(self.ledger.optimizer_steps, self.tracker.losses)

    def _diagnose(self) -> Finding:
        """Where a skipped step went non-finite: the cheap flags, then a replay under the tracer."""
        if self.model is None:
            return Finding("backward", None, "nan", "unknown")
        return self.tracker.attribute(self.model, self._replayer())

    def _replayer(self) -> Callable[[Any], tuple[bool, Finding | None]] | None:
        passes, model = self.batch.backward_passes, self.model
        if not self.replay.ready or passes == 0 or is_sharded(model.parameters()):
            return None  # FSDP2 / tensor parallel: a replayed forward/backward would run collectives again

        def replay(expected: Any) -> tuple[bool, Finding | None]:
            try:
                found = self.replay.replay(model, self.buffers.restore, self.autocast(), self.stepper.scale, passes)
            except Exception as error:  # a replay must never break training: fall back to the cheap attribution
                self.warn(f"AdaptiveMP: could not replay the bad step to locate it ({first_line(error)}).")
                return True, None
            if self.rescue_enabled:
                self.rerun_state.learn(self.replay.written)
            return True, found

        return replay

    def _decide(
        self,
        optimizer: Optimizer,
        finding: Finding | None,
        repeat: bool,
        spike: float | None = None,
        skipped: bool | None = None,
        scale: float | None = None,
    ) -> None:
        """After a step: count it, promote a repeatedly blamed module, climb the ladder if due, record the event.

        ``repeat``: the batch was already attributed for another optimizer (manual optimization); its step is
        skipped too, but the bad batch is one event, already recorded. ``skipped``: the step was skipped without
        a finding (a fused optimizer's own skip, found after the fact); by default, whether there is a finding.
        """
        skipped = finding is not None if skipped is None else skipped
        self._last_skipped[id(optimizer)] = self._last_skipped[None] = skipped
        self.ledger.step_ended(skipped, self.rescue.rescued)
        if not skipped:
            self.batch.stepped = True
            self.spikes.clean_step(self.tracker.losses)
        elif not self.batch.stepped:
            # "Skipped" means nothing changed, BatchNorm statistics included. Once another optimizer has stepped
            # cleanly on this batch (a GAN's generator), its forward's buffer updates stay with that step.
            self.buffers.restore()
        at_floor = self.stepper.at_floor
        if repeat:
            self._floor_pending |= at_floor  # climbed with the next recorded event
            return
        at_floor, self._floor_pending = at_floor or self._floor_pending, False
        why = self.ladder.observe(skipped, at_floor)
        if finding is None:
            return
        promotion = self._promote_blamed(finding)
        action = self.stepper.last_action  # before a switch to bf16 drops it
        scale = scale if scale is not None else self.stepper.scale
        escalation = self._escalate(why, finding.module or self.ledger.last_blamed_module()) if why else None
        if promotion is not None or (escalation is not None and escalation.rung is Rung.PROMOTE):
            self.spikes.open(self.ledger.optimizer_steps)
        self.ledger.record(finding, scale, action, promotion, escalation, spike)
        if escalation is not None and escalation.rung is Rung.GIVE_UP:
            raise LossScaleFloorError(give_up_message(escalation.reason, self.ledger.events[-5:]))

    def _promote_blamed(self, finding: Finding) -> Promotion | None:
        if not self.options.auto_fallback or self.model is None:
            return None
        can_help = self.stepper.can_help() and not self.rescue.nonfinite_unscaled
        promotion = self.fallback.promote_blamed(
            self.model, finding, self.ledger.optimizer_steps, self.device, can_help
        )
        if promotion is not None:
            self.warn(promotion_message(promotion, finding, self.format.short))
        return promotion

    def _escalate(self, why: str, blamed: str | None) -> Escalation:
        """Take the first rung of the ladder that applies (``GIVE_UP`` is raised by the caller)."""
        self.stepper.acknowledge_floor()
        names = [fqn for fqn, _ in self.model.named_modules() if fqn] if self.model is not None else []
        can_switch = self.format.scaled and resolve_auto_precision(self.device) == "bf16-mixed"
        for candidate in self.ladder.candidates(why, blamed, self.fallback.promotions, names, can_switch):
            if candidate.rung is Rung.PROMOTE:
                step = self.ledger.optimizer_steps
                if self.fallback.promote(self.model, candidate.module, Reason.ESCALATION, self.device, step, why):
                    self.warn(f"AdaptiveMP escalation: {why}; {candidate.module} runs in fp32 from now on.")
                    return candidate
                continue
            if candidate.rung is Rung.SWITCH_TO_BF16:
                self.warn(f"AdaptiveMP escalation: {why}; switching from fp16 to bf16 (same range as fp32).")
                self.switch_to_bf16()
            return candidate
        raise AssertionError("the ladder always ends with GIVE_UP")

    def switch_to_bf16(self) -> None:
        self._use(format_of("bf16-mixed"), self.device or default_device())
        self.switched_to_bf16 = True

    def collect_statistics(self) -> None:
        """Fold a sampled step's statistics in (after unscaling); nothing on other steps."""
        if not (self.statistics.active and self.model is not None):
            return
        self.statistics.collect(self.model, self.stepper.scale or 1.0, self.stats_dtype)
        if self.stepper.wants_backward_amax() and self.statistics.backward_amax is not None:
            # Activation gradients are each rank's own: agree on the largest, or ranks would pick scales.
            value = self.statistics.backward_amax
            (value,) = all_reduce([math.inf if math.isnan(value) else value], "MAX")
            self.stepper.observe_backward_amax(value)

    def _end_step(self) -> None:
        self.stepper.end_step()
        self.tracker.end_step()
        if self.scaler is not None:
            self.scales.record(self.ledger.optimizer_steps, self.scaler.get_scale())  # a host float: no sync
        self.rescue.begin_batch()
        self.batch.end()
        self._step_open = False
        self._unscaled.clear()

    # ------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "switched_to_bf16": self.switched_to_bf16,
            "scaler": self.stepper.state_dict(),
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
            self.warn(
                f"Resuming a {saved!r} checkpoint with AdaptiveMP(precision={self.precision!r}): the saved"
                " loss-scaler state does not apply and is ignored; counters and promotions are kept."
            )
        self.ledger.load_state_dict(state_dict)
        self.ladder.load_state_dict(state_dict.get("ladder", {}))
        self.scales.load_state_dict(state_dict.get("scale_history", {}))
        if state_dict.get("scaler") and saved == self.precision:
            self.stepper.load_state_dict(state_dict["scaler"])
        if self.model is not None:
            self.fallback.load_state_dict(self.model, state_dict.get("promotions", ()), self.device)


def _floor_noted(scaler: AdaptiveLossScaler) -> None:
    """The scaler's ``on_floor`` while the core owns it: nothing here (we are inside ``update()``); the core
    reads ``ScaleAction.FLOOR`` afterwards and climbs its escalation ladder with the step's event."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
