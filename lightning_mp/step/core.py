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
    guard     step, or skip a step whose gradients are not finite (``StepGuard``, through ``Stepper.step``)
    attribute where a skipped step went non-finite: cheap flags, then a replay (``diagnosis``)
    promote   the module the evidence names, on repeated blame (``fallback.promotion``)
    escalate  climb the ladder when skipping gets nowhere (``fallback.escalation``)
    record    the event, the counts, the scale history (``reporting``)

Each collaborator has one job and lives in its folder; the core wires them and reads its format
(``formats``) instead of branching on the precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.diagnosis.attribution import OverflowTracker
from lightning_mp.diagnosis.hooks import eager
from lightning_mp.diagnosis.replay import StepReplay
from lightning_mp.diagnosis.statistics import Sampler
from lightning_mp.options import PluginOptions
from lightning_mp.reporting.history import ScaleHistory
from lightning_mp.reporting.ledger import RunLedger
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.scaling.rescue import Rescue
from lightning_mp.scaling.stepper import GuardedStep, ScaledStep
from lightning_mp.step.batch import Batch
from lightning_mp.step.buffers import BufferSnapshot
from lightning_mp.step.decisions import Decisions
from lightning_mp.step.guard import StepGuard
from lightning_mp.step.precision import RunPrecision
from lightning_mp.step.side_effects import RerunState
from lightning_mp.weights.run import RunWeights, to_low_precision

__all__ = ["PrecisionCore", "StepOutcome"]


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
        sharded = options.sharded_gradients  # FSDP1: no replay or re-run (they would run collectives again)
        self.setting = RunPrecision(options, self.warn)
        self.tracker = OverflowTracker(options.watch_steps)
        self.rescue = Rescue(False if sharded else options.rescue)
        # A re-run draws the same dropout masks: the RNG is kept for the replay and for a rescue.
        self.replay = StepReplay(enabled=options.replay and not sharded, save_rng=self.rescue.option is not False)
        self.sampler = Sampler(options.stats, options.stats_every)
        self.statistics = self.sampler.statistics
        self.buffers = BufferSnapshot()  # what a skipped step puts back (BatchNorm statistics)
        self.rerun_state = RerunState()  # a re-run starts from the step's own start (an EMA teacher, a counter)
        self.batch = Batch(self.tracker, self.replay, self.buffers, self.statistics, self.rerun_state)
        self.decisions = Decisions(options, self.setting, self.batch, self.tracker, self.rescue, self.warn)
        self.scales = ScaleHistory()  # the loss scale after every optimizer step (fp16), for the report's plot
        self.weights = RunWeights(options.master_weights, self.warn)  # remedies, lost updates, optimizer care
        self._sampled_batch = False  # this batch's statistics were sampled: its optimizer steps measure lost updates
        self.model: nn.Module | None = None
        self._step_open = False  # an optimizer step has begun (counted) and not ended
        self._unscaled: set[int] = set()  # id(optimizer): unscaled in this step
        self.guard = StepGuard(
            self.setting, self.batch, self.tracker, self.replay, self.rescue, self.decisions, self.scales, self.warn
        )

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, record_order: bool = True) -> None:
        """Take the model (its device resolves ``"auto"``), apply the fp32 islands, record execution order."""
        if self.setting.device is None or self.setting.format is None:
            param = next(model.parameters(), None)
            self.setting.resolve(self.setting.device or (param.device.type if param is not None else "cpu"))
        self.model = self.decisions.model = model
        self.buffers.watch(model)
        self.batch.end()  # a new fit: what an earlier one kept of its last batch is stale
        self.rerun_state.clear()
        fmt, fallback = self.setting.format, self.decisions.fallback
        fallback.setup(model, fmt.fp32_defaults, self.setting.device, low_dtype=fmt.weights_dtype)
        self.weights.setup(model, fmt.weights_dtype)
        low_bit = self.decisions.low_bit
        low_bit.setup(model, fmt.low_bit, fmt.name, set(fallback.promotions), self.setting.device or "cpu")
        if fmt.low_bit is not None and not low_bit.converted:
            self.warn(no_low_bit_layer_message(model, fmt))
        if record_order:
            self.tracker.order.record(model)  # removed after the first optimizer step (or at teardown)

    def convert_weights(self, model: nn.Module) -> None:
        """``"bf16-true"`` / ``"16-true"``: the model's weights and buffers in the weights' dtype, in place, except
        the modules that will run in fp32 (``fp32_modules``, the format's defaults), which keep theirs exactly."""
        fmt = self.setting.format
        if fmt is None or fmt.weights_dtype is None:
            return
        defaults = fmt.fp32_defaults if self.options.fp32_defaults else ()
        to_low_precision(model, fmt.weights_dtype, self.decisions.fallback.selected(model, defaults))

    def adopt_optimizers(self, optimizers: list[Optimizer], keep: str | None = "with Fabric") -> list[Optimizer]:
        """Apply the weights' remedy to the run's optimizers and check their settings (``weights.RunWeights``);
        returns the optimizers to use. ``keep``: why they must not be replaced by a library's (the Trainer may
        replace a torch one when this is ``None``)."""
        return self.weights.adopt(optimizers, keep)

    def restart(self) -> PrecisionCore:
        """A core for a new fit with the same options: counts, events, promotions, the scale and its history,
        and everything learned start afresh, as they did for the first fit; a scaler the user passed is put
        back to its state at construction. (A resumed fit then restores them from its checkpoint.)"""
        self.setting.restart_scaler()
        return PrecisionCore(self.options, self.warn)

    def teardown(self) -> None:
        """Remove every hook we may still hold (an interrupted run, or a run with no optimizer step)."""
        self.settle_pending()
        self.batch.forget()  # the last batch is the user's, not ours to keep alive
        self.decisions.spikes.clear()
        self.tracker.stop()
        self.decisions.low_bit.disarm()  # first: an interrupted step's samples are not judged (nor reduced)
        self.collect_statistics()

    # ------------------------------------------------------------------------------------- what it reads
    @property
    def stepper(self) -> GuardedStep | ScaledStep:
        return self.setting.stepper

    @property
    def scaler(self) -> AdaptiveLossScaler | None:
        return self.setting.scaler

    @scaler.setter
    def scaler(self, scaler: AdaptiveLossScaler) -> None:
        self.setting.scaler = scaler

    @property
    def ledger(self) -> RunLedger:
        return self.decisions.ledger

    @property
    def stats_every(self) -> int:
        """Statistics are sampled on one optimizer step in this many (the format's default unless set)."""
        return self.sampler.cadence.every(self.setting.stats_every)

    @property
    def rescue_enabled(self) -> bool:
        return self.rescue.enabled(self.scaler)

    @property
    def step_open(self) -> bool:
        """An optimizer step has begun and not ended."""
        return self._step_open

    def step_was_skipped(self, optimizer: Optimizer | None = None) -> bool:
        self.settle_pending()
        return self.decisions.step_was_skipped(optimizer)

    # ---------------------------------------------------------------------------------- micro-batches
    def _open_step(self) -> None:
        """An optimizer step begins (at its first micro-batch, or at the step itself): count it once."""
        if self.guard.pending is not None:
            self.settle_pending()  # the last step's, if it was decided on the device
        if not self._step_open:
            self._step_open = True
            self.ledger.start_step()

    def _begin(self) -> None:
        """A micro-batch is about to run: the first of a batch begins it, and the step opens."""
        if self.batch.due:
            if self.guard.pending is not None:
                self.settle_pending()
            self.batch.begin_if_due(self.model, self.setting.device, self.rescue_enabled)
            self._sampled_batch = False  # a new batch: sampled or not is decided by its first micro-batch
        if not self._step_open:
            self._open_step()

    def begin_micro_batch(self) -> None:
        """A training micro-batch's forward begins: the step opens and a sampled step's hooks are armed."""
        self._begin()
        if self.batch.start_micro_batch() and self.model is not None:
            step = self.decisions.ledger.optimizer_steps
            if self.sampler.arm(self.model, step, self.setting.stats_every, self.stepper):
                self.decisions.low_bit.arm(step)

    @contextlib.contextmanager
    def micro_batch(self) -> Generator[None, None, None]:
        """Around a training micro-batch's forward: ``begin_micro_batch``, then the ``training_context``."""
        self.begin_micro_batch()
        with self.training_context():
            yield

    def training_context(self) -> contextlib.AbstractContextManager:
        """Autocast, and eager execution of compiled code while statistics or attribution hooks are armed
        (compiled code would not run them; see ``hooks.eager``)."""
        if not (self.statistics.active or self.tracker.hooked or self.decisions.low_bit.armed):
            return self.setting.autocast()  # the common step: nothing else to enter
        stack = contextlib.ExitStack()
        stack.enter_context(eager())
        stack.enter_context(self.setting.autocast())
        return stack

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

    def after_backward(self) -> None:
        """After each backward: with fp32 masters, the micro-batch's gradients move into them (accumulated in fp32)."""
        self.weights.after_backward()

    def run_closure(self, closure: Callable[[], Any], training: bool = True) -> Any:
        """Run the closure; a low-precision kernel failure promotes its module to fp32 and retries.

        ``training=False`` (an evaluation forward) leaves the buffers alone: nothing to undo there. With rescues
        on, the first step's closure runs under a write watch (``RerunState.first_run``).
        """
        while True:
            try:
                if training and self.rerun_state.watch_next and self.rescue_enabled and not self.batch.rerunning:
                    return self.rerun_state.first_run(self.model, closure)
                return closure()
            except (RuntimeError, NotImplementedError) as error:
                if not self.promote_after_kernel_error(error):
                    raise
                # The failed forward may have updated BatchNorm: undo it, unless that would also undo the clean
                # micro-batches before it in an accumulated step.
                if training and self.batch.micro_batches == 1:
                    self.buffers.restore()

    def promote_after_kernel_error(self, error: BaseException) -> bool:
        return self.decisions.promote_after_kernel_error(error)

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
        self._adopt(optimizer)
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
            return StepOutcome(result, self._step(optimizer, kwargs), stepped=True)
        finally:
            self._end_step()

    def _adopt(self, optimizer: Optimizer) -> None:
        """An optimizer first seen at its step (Fabric's): its remedy and checks now."""
        if self.model is not None and not self.weights.knows(optimizer):
            try:
                self.weights.adopt([optimizer], keep="with Fabric")
            except Exception:
                self.teardown()  # refused at the first step: nothing of ours (sampling hooks) stays armed
                raise

    def _step(self, optimizer: Optimizer, kwargs: dict[str, Any]) -> Any:
        """Step or skip, with the weights' side around it: promoted weights' state in fp32, lost updates measured
        on a sampled batch (every optimizer it steps; again on the next step when it measured nothing, e.g. a
        warm-up at lr 0), masters rounded into the model's weights after it."""
        self._reconcile()
        lost = self.weights.lost
        if (self._sampled_batch or lost.retry) and (self.weights.dtype is not None or not lost.samples):
            # Every sampled step with low-precision weights; with fp32 weights (autocast) the first only, where
            # it reads ~0 (the check that the measure is right) and costs nothing after (1% of step time at every
            # 100th step otherwise: python -m benchmarks.lost_update_cost).
            self.weights.arm(optimizer)
        output = self.guard.step_or_skip(optimizer, kwargs)
        self.weights.after_step(optimizer)
        self.weights.measure_memory(optimizer)
        self._reconcile()
        return output

    def _reconcile(self) -> None:
        """After a promotion made fp32 weights out of low-precision ones: their optimizer state follows."""
        self.weights.follow_promotions(len(self.decisions.fallback.promotions))

    def unguarded_step(self, step: Callable[[], Any], optimizer: Optimizer | None = None) -> Any:
        """A step the plugin cannot look inside (LBFGS re-evaluates its closure in ``step()``; the guard turned
        off): counted and sampled, run as the framework runs it; fp32 masters take the gradients just before
        ``optimizer.step`` and give the weights back just after it."""
        self._open_step()
        handles = self.weights.around_step(optimizer) if optimizer is not None else []
        try:
            return step()
        finally:
            for handle in handles:
                handle.remove()
            self.collect_statistics()
            self._end_step()

    def prepare_clipping(self, optimizer: Optimizer) -> bool:
        """Unscale for a clip before the step (Fabric); whether the gradients are non-finite (asked once)."""
        self._open_step()
        self._adopt(optimizer)
        self._unscale(optimizer, None)
        self.collect_statistics()
        return self.stepper.nonfinite(optimizer)

    def _unscale(self, optimizer: Optimizer, rerun: Callable[[list[Any]], Any] | None) -> Any:
        """Unscale (once per step), rescuing an fp16 overflow born in the backward when ``rerun`` can; returns
        the last re-run's closure result, if any."""
        if id(optimizer) in self._unscaled:
            return None  # fabric.clip_gradients unscaled it already
        self._unscaled.add(id(optimizer))
        self.weights.gather(optimizer)  # fp32 masters: the gradients are unscaled, guarded and clipped there
        batch, model = self.batch, self.model
        can = self.rescue.applies(self.scaler, batch.micro_batches, len(self.replay.kept), self.replay.active)
        can = can and rerun is not None and model is not None

        def run_again() -> Any:
            result: list[Any] = []
            written = batch.rerun(model, self.run_closure, lambda runs: result.append(rerun(runs)))
            self.weights.gather(optimizer)
            if written:
                self.warn(rerun_writes_message(written))
            return result[-1] if result else None

        return self.rescue.unscale(self.stepper, optimizer, can, self.tracker.forward_finite, run_again)

    def settle_pending(self) -> None:
        """Judge the last step if an optimizer decided it on the device (see ``StepGuard``)."""
        self.guard.settle_pending()

    def when_settled(self, optimizer: Optimizer, then: Callable[[bool], None]) -> None:
        """Call ``then(skipped)`` once ``optimizer``'s last step is known (see ``StepGuard.when_settled``)."""
        self.guard.when_settled(optimizer, then)

    def collect_statistics(self) -> None:
        """Fold a sampled step's statistics in (after unscaling), and move back the low-bit layers they say the
        format hurts; nothing on other steps."""
        moves = self.decisions.low_bit.collect()
        if moves:
            self.decisions.move_low_bit(moves)
        if self.model is not None:
            if not self.statistics.active:
                return  # not a sampled step
            self._sampled_batch = True  # every optimizer step of this batch measures its lost updates
            stepper = self.stepper
            grad_of = self.weights.grad_of if self.weights.masters else None  # fp32 masters hold the gradients
            amax = self.sampler.collect(self.model, stepper.scale or 1.0, self.setting.stats_dtype, grad_of)
            if amax is not None and stepper.wants_backward_amax():
                stepper.observe_backward_amax(amax)

    def _end_step(self) -> None:
        self.weights.collect(self.ledger.optimizer_steps)
        self.stepper.end_step()
        self.tracker.end_step()
        if self.guard.pending is None:  # else when the device verdict is read
            self.guard.record_scale()
        self.rescue.begin_batch()
        self.batch.end()
        self._step_open = False
        self._unscaled.clear()

    # ------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The run's state, in one place: the precision and its scaler, decisions and counts, the scale history."""
        self.settle_pending()
        return {
            **self.setting.state_dict(),
            **self.decisions.state_dict(),
            "scale_history": self.scales.state_dict(),
            "weights": self.weights.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore after setup and before the first new step, so promotions apply to the first forward."""
        self.setting.load_state_dict(state_dict)
        self.decisions.load_state_dict(state_dict)
        self.scales.load_state_dict(state_dict.get("scale_history", {}))
        self.weights.load_state_dict(state_dict.get("weights", {}))
        self._reconcile()  # promotions re-applied from the checkpoint


def rerun_writes_message(names: list[str]) -> str:
    """What a rescue tells when its re-run wrote parameters that were not copied at the step's start."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"AdaptiveMP: training_step writes {shown} in place (an EMA teacher?). A rescue ran the step again and"
        " they were put back as one run leaves them, but this re-run read them after a second write. From now on"
        " they are copied when each step begins, so later rescues start exactly where the step did."
    )


def no_low_bit_layer_message(model: nn.Module, fmt: Any) -> str:
    """What a user who asked for fp8/int8 is told when no layer of the model could be converted."""
    return (
        f"AdaptiveMP(precision={fmt.name!r}): no layer of {type(model).__name__} multiplies in {fmt.low_bit}, so it"
        " trains in bf16. Only plain nn.Linear layers convert (not, e.g., Hugging Face GPT-2's Conv1D), with both"
        " dimensions divisible by 16; by default not the first or last Linear and none under 64 x 64 weights"
        " (choose others with low_bit_modules=)."
    )


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
