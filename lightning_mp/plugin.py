"""``AdaptiveMP``: the Lightning precision plugin, a shell of Trainer hooks over :class:`~.core.PrecisionCore`.

Each hook does Lightning's part (where in the step it runs, which Lightning hooks it calls) and hands the
precision work to the core. When nothing goes wrong the numerics are Lightning's ``MixedPrecision``: the same
autocast context, the same unscale / clip / step order, so the weights match it bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_mp._compat import (
    after_closure,
    muted_step_counting,
    optimizer_handles_unscaling,
    restore_weight_averaging,
    skip_weight_averaging_on_skipped_steps,
)
from lightning_mp.core import PrecisionCore, first_line
from lightning_mp.ledger import EventWarnings
from lightning_mp.options import PluginOptions
from lightning_mp.precision import PrecisionName, cpu_has_native_bf16, resolve_auto_precision
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.schedulers import skip_aware
from lightning_mp.shell import CoreView

__all__ = ["AdaptiveMP", "adaptive_plugin", "cpu_has_native_bf16", "resolve_auto_precision"]


class AdaptiveMP(CoreView, Precision):
    """Mixed precision for Lightning: adaptive loss scaling, a non-finite guard, attribution and fp32 fallback.

    Use as ``Trainer(plugins=[AdaptiveMP()])`` and do not also pass ``Trainer(precision=...)``.

    Args:
        precision: ``"auto"`` (resolved at setup: bf16 where the device runs it natively, else fp16 on
            CUDA, else fp32), ``"16-mixed"``, ``"bf16-mixed"`` or ``"32-true"``.
        device: device type for autocast; ``None`` takes it from the model at setup.
        scaler: the :class:`AdaptiveLossScaler` for ``"16-mixed"``, or a dict of its arguments (built for the
            device at setup; what a YAML config gives), or a plain ``torch.amp.GradScaler`` (what
            ``MixedPrecision(scaler=...)`` took: its settings and state carry over into an ``AdaptiveLossScaler``
            under GradScaler's own rule, ``policy="dynamic", hysteresis=1``, with a warning saying so); ``None``
            builds a default one. Must be ``None`` for ``"bf16-mixed"`` and ``"32-true"``.
        fp32_modules: modules that always run in fp32: classes, fqn glob patterns (``"encoder.*.norm"``) or
            ``(module, fqn) -> bool`` filters. A pattern that matches nothing is an error at setup.
        auto_fallback: promote a module to fp32 when it is blamed for ``promote_after`` overflows within
            ``promote_window`` steps, or when its low-precision kernel raises (the step is then retried).
        fp32_defaults: also run ``fallback.DEFAULT_FP32_MODULES[precision]`` in fp32 (``LayerNorm`` and
            ``LogSoftmax`` in fp16, whose CPU fp16 kernels keep running sums in fp16; nothing in bf16).
        guard_nonfinite: skip bf16/fp32 steps whose gradients are not finite (fp16 is always guarded by the
            scaler). Costs one reduction over the gradients per step; on a GPU it also reads one flag.
        promote_after: see ``auto_fallback``.
        promote_window: see ``auto_fallback``.
        watch_steps: optimizer steps the forward probe stays armed after an overflow it could not localize.
        max_consecutive_skips: skipped steps in a row that trigger the next rung of the escalation ladder.
        max_events: overflow events kept in memory (oldest dropped; ``overflow_counts`` keeps the totals).
        stats: per-module headroom/underflow statistics: ``"off"``, ``"cheap"`` (module outputs and parameter
            gradients) or ``"full"`` (also the gradients flowing into every module output).
        stats_every: sample the statistics on one optimizer step out of this many. ``None``: 25 in fp16 (the
            predictive scaler reads the samples; range is what fp16 runs out of), 100 in bf16 and fp32 (fp32's
            range: there the samples watch for values running away, and cost a quarter as much), and the first
            step too, so that a short run's report has figures.
        attach_callbacks: add ``LossScaleMonitor``, ``OverflowDiagnostics`` and ``PrecisionReport`` to the
            Trainer at setup unless it already has them.
        sharded_gradients: each rank holds only a shard of plain-tensor gradients (FSDP1's flat parameters;
            ``AdaptiveFSDPMP`` sets it): every non-finite flag is combined across ranks before a step is taken.
        replay: run a bad step again under an operation tracer to name the operation and source line where its
            first non-finite value was born (bad steps only; off with ``sharded_gradients``).
        rescue: fp16: when a step overflows in the backward because of the loss scale (inputs and loss finite,
            scale above its floor), lower the scale and run the step's forward/backward again on the same batch
            instead of skipping it: no batch is lost, the step count and LR schedule are unchanged, at the cost
            of one extra forward/backward (what a skipped step wastes). Steps of one micro-batch in automatic
            optimization only (with gradient accumulation or manual optimization the step is skipped as
            before); the re-run's ``self.log`` calls are muted. ``None``: on with the predictive scaler policy,
            off with ``policy="dynamic"`` (which then reproduces GradScaler).

    Raises:
        ValueError: an unknown ``precision``, a ``scaler`` that is not an ``AdaptiveLossScaler``, a scaler
            given with bf16 / fp32, or any knob out of range.
    """

    def __init__(
        self,
        precision: PrecisionName = "auto",
        device: str | None = None,
        scaler: AdaptiveLossScaler | torch.amp.GradScaler | dict[str, Any] | None = None,
        fp32_modules: Any = (),
        auto_fallback: bool = True,
        *,
        fp32_defaults: bool = True,
        guard_nonfinite: bool = True,
        promote_after: int = 2,
        promote_window: int = 100,
        watch_steps: int = 20,
        max_consecutive_skips: int = 50,
        max_events: int = 10_000,
        stats: str = "cheap",
        stats_every: int | None = None,
        attach_callbacks: bool = True,
        sharded_gradients: bool = False,
        replay: bool = True,
        rescue: bool | None = None,
    ) -> None:
        options = PluginOptions(
            precision, device, scaler, fp32_modules, auto_fallback, fp32_defaults, guard_nonfinite, promote_after,
            promote_window, watch_steps, max_consecutive_skips, max_events, stats, stats_every, attach_callbacks,
            sharded_gradients, replay, rescue,
        )  # fmt: skip
        self.core = PrecisionCore(options)
        self._warnings = EventWarnings()  # one warning per new place (or kind) a step went non-finite
        self._trainer: pl.Trainer | None = None
        self._attached: list[pl.Callback] = []  # the default callbacks this plugin added to the Trainer
        self._averaging: list[pl.Callback] = []  # weight-averaging callbacks told to skip skipped steps

    # ------------------------------------------------------------------------------------------ setup
    @override
    def convert_module(self, module: Module) -> Module:
        # Every Trainer strategy calls this with the LightningModule, already attached to its Trainer. Anything
        # else is Fabric (whose hooks this class does not implement): say which class to use there.
        if _trainer_of(_unwrap(module)) is None:
            raise TypeError(
                "lightning_mp.AdaptiveMP is the Trainer plugin; with Lightning Fabric use"
                " `from lightning_mp.fabric import AdaptiveMP` (the same knobs): Fabric(plugins=[AdaptiveMP()])."
            )
        return module

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        # Called by every strategy after the model is on its device and the optimizers exist. The model may
        # be wrapped (DDP), and DDP discards what this returns: islands are applied in place, inside.
        module = _unwrap(model)
        self._trainer = _trainer_of(module)
        fitting = self._trainer is None or self._trainer.training
        if fitting and self.core.model is not None:
            # A second fit with the same plugin (a new Trainer or model, or lr_find's trial fit before the real
            # one) is a run of its own: its counts and decisions start afresh instead of adding to the last.
            self.core = self.core.restart()
        self.core.setup(module, record_order=fitting)
        if self._trainer is not None:
            self._keep_training_steps(self._trainer, module)
            # Manual optimization toggles requires_grad between optimizers: a replay starts from the batch's flags.
            self.core.replay.track_flags(None if module.automatic_optimization else module)
        if self.core.options.attach_callbacks and self._trainer is not None:
            from lightning_mp.callbacks import attach_default_callbacks  # they import this module

            self._attached = attach_default_callbacks(self._trainer)
        lr_schedulers = [skip_aware(config, self.core.step_was_skipped) for config in lr_schedulers]
        if self._trainer is not None:  # EMAWeightAveraging & co. average real steps only
            self._averaging = skip_weight_averaging_on_skipped_steps(
                self._trainer.callbacks, self.core.step_was_skipped
            )
        return model, optimizers, lr_schedulers

    @override
    def teardown(self) -> None:
        if self._trainer is not None:
            self._trainer.strategy.__dict__.pop("training_step", None)  # our wrapper (see _keep_training_steps)
        restore_weight_averaging(self._averaging)
        self._averaging = []
        self.core.teardown()
        super().teardown()

    # ---------------------------------------------------------------------------------------- replay
    def _keep_training_steps(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Let the core replay a bad step: every ``training_step`` call registers how to run it again, and its
        batch is observed (attribution reads it if the step goes bad).

        The strategy's ``training_step`` (what Lightning's loop calls, with the batch already on the device) is
        wrapped on this strategy instance for the fit; only references to its arguments are kept.
        """
        strategy = trainer.strategy
        strategy.__dict__.pop("training_step", None)  # a wrapper from an earlier fit
        original = strategy.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")  # as the LightningModule's training_step gets it
            self.core.keep_micro_batch(functools.partial(self._replay_micro_batch, module, args, kwargs), batch)
            return original(*args, **kwargs)

        strategy.training_step = training_step

    def _replay_micro_batch(
        self, module: pl.LightningModule, args: tuple, kwargs: dict, backward: Callable[[Tensor], None]
    ) -> None:
        """Run one micro-batch's ``training_step`` again, handing its loss to ``backward`` where Lightning's
        loop would call backward. Logging is muted and optimizer steps are never taken."""
        undo = muted_step_counting(_lightning_optimizers(module))
        if not module.automatic_optimization:
            module.manual_backward = lambda loss, *a, **k: backward(loss)
        try:
            with _muted_logging(module):
                output = module.training_step(*args, **kwargs)
            if module.automatic_optimization:
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if isinstance(loss, Tensor):
                    accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
                    backward(loss / accumulate if accumulate > 1 else loss)
        finally:
            module.__dict__.pop("manual_backward", None)
            undo()

    # -------------------------------------------------------------------------------------- autocast
    def autocast_context_manager(self) -> contextlib.AbstractContextManager:
        return self.core.autocast()

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast for training, validation, test and predict steps."""
        with self.core.autocast():
            yield

    @override
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        self.core.start_micro_step()
        with self.core.training_context():
            yield

    @override
    @contextlib.contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        try:
            with self.core.autocast():
                yield
        except (RuntimeError, NotImplementedError) as error:
            # A validation step cannot be retried from here: promote the module and skip this one batch.
            if not self.core.promote_after_kernel_error(error):
                raise
            rank_zero_warn(f"AdaptiveMP: skipped one validation batch after a kernel error ({first_line(error)}).")

    # -------------------------------------------------------------------------------------- backward
    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        return super().pre_backward(self.core.scale_loss(tensor), module)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizable,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        core = self.core
        if core.replay.active:
            # A replayed manual-optimization training_step reached opt.step(): its closure may hold the backward
            # the replay needs (opt.step(closure=...)). Nothing is stepped; the replay goes on to the backward
            # that went bad (a GAN's discriminator steps after its generator) and ends there.
            closure()
            return None
        scaled = core.scaler is not None
        lbfgs = isinstance(optimizer, LBFGS)
        if lbfgs and scaled:
            raise MisconfigurationException("AMP and the LBFGS optimizer are not compatible.")
        if lbfgs or (not scaled and not core.options.guard_nonfinite):
            # Lightning's own path. LBFGS re-evaluates the closure inside step(): there is no point between
            # backward and the update where a guard could look, so bf16/fp32 LBFGS runs unguarded, as in Lightning.
            core.start_step()  # counted here too: statistics sample on every stats_every-th step
            try:
                return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
            finally:
                core.collect_statistics()
                self._end_step()  # the step is over here too: drop its observations and the order hooks
        core.start_step()
        try:
            closure_result = core.run_closure(closure)
            automatic = model.automatic_optimization
            # In automatic optimization a training_step that returned None skipped backward: nothing to step.
            skip_backward = closure_result is None and automatic
            # Optimizers that unscale inside step() (fused Adam) cannot be clipped; see clip_gradients.
            # An fp16 overflow born in the backward re-runs the closure at a lower scale (automatic optimization).
            rerun = _Rerun(self, model, closure, optimizer) if scaled and automatic and not skip_backward else None
            handles = skip_backward or optimizer_handles_unscaling(optimizer)
            core.unscale(optimizer, handles_unscaling=handles, rerun=rerun)
            if rerun is not None and rerun.ran:
                closure_result = rerun.result
            after_closure(self, model, optimizer)  # on_before_optimizer_step, then clipping: true gradients
            if skip_backward:
                return closure_result
            _, step_output = core.step(optimizer, **kwargs)
            # What Lightning returns: GradScaler.step's output in fp16, else what optimizer.step(closure) would.
            return step_output if scaled else closure_result
        finally:
            self._end_step()

    def _end_step(self) -> None:
        self.core.end_step()
        for message in self._warnings.new(self.core.ledger):
            rank_zero_warn(message)

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val <= 0:
            return  # Lightning calls this every step; nothing to clip (what the base class returns on)
        refuse_clipping_fused(optimizer, clip_val)
        super().clip_gradients(optimizer=optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after setup and before the first new step: promotions apply to its forward.
        self.core.load_state_dict(state_dict)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restored the callbacks it knew before connect() attached ours: give ours their state.
        saved_callbacks = checkpoint.get("callbacks", {})
        for callback in self._attached:
            if callback.state_key in saved_callbacks:
                callback.load_state_dict(saved_callbacks[callback.state_key])
        # A run started with Lightning's MixedPrecision keeps its GradScaler state under "MixedPrecision":
        # carry the scale over so switching to AdaptiveMP does not restart the scale search.
        legacy = checkpoint.get("MixedPrecision")
        if legacy and self.scaler is not None and not {"AdaptiveMP", "AdaptiveFSDPMP"} & checkpoint.keys():
            self.scaler.load_state_dict(legacy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, device={self.device!r}, scaler={self.scaler!r})"


def adaptive_plugin(trainer: pl.Trainer) -> AdaptiveMP | None:
    """The ``AdaptiveMP`` driving ``trainer``: its precision plugin, or the one inside ``AdaptiveFSDPMP``."""
    plugin = trainer.precision_plugin
    plugin = getattr(plugin, "adaptive", plugin)
    return plugin if isinstance(plugin, AdaptiveMP) else None


def refuse_clipping_fused(optimizer: Optimizer, clip_val: float) -> None:
    """Lightning's refusal, kept: an optimizer that unscales inside ``step()`` has scaled gradients to clip."""
    if clip_val > 0 and optimizer_handles_unscaling(optimizer):
        raise RuntimeError(
            f"The current optimizer, {type(optimizer).__qualname__}, does not allow for gradient clipping"
            " because it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer?"
        )


def _lightning_optimizers(module: pl.LightningModule) -> list[Any]:
    try:
        optimizers = module.optimizers(use_pl_optimizer=True)
    except RuntimeError:  # no trainer attached
        return []
    return optimizers if isinstance(optimizers, list) else [optimizers]


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


class _Rerun:
    """Runs a step's forward and backward again with ``self.log`` muted, for a rescue: a rescued step's metrics
    are logged once, by its first run.

    One micro-batch: Lightning's closure (training_step, zero_grad, backward); its result replaces the first
    run's. An accumulated step: ``runs``, each kept micro-batch's ``training_step`` (see ``StepReplay``), each
    loss through the strategy's backward as Lightning's loop does (normalised by ``accumulate_grad_batches``,
    ``on_before_backward`` / ``on_after_backward`` called), after zeroing the gradients the first attempt summed.
    """

    def __init__(self, plugin: AdaptiveMP, module: pl.LightningModule, closure: Callable[[], Any], optimizer) -> None:
        self.plugin, self.module, self.closure, self.optimizer = plugin, module, closure, optimizer
        self.ran, self.result = False, None

    def __call__(self, runs: list[Callable[[Callable[[Tensor], None]], None]]) -> Any:
        if runs:
            strategy = self.module.trainer.strategy
            self.optimizer.zero_grad()
            for run in runs:
                with self.plugin.core.training_context():
                    run(lambda loss: strategy.backward(loss, self.optimizer))
            return None
        with _muted_logging(self.module):
            self.result = self.closure()
        self.ran = True
        return self.result


@contextlib.contextmanager
def _muted_logging(module: pl.LightningModule) -> Generator[None, None, None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (a step run again must not count its metrics twice).
    Instance attributes shadowing the methods, removed on the way out."""
    module.log = module.log_dict = _ignore
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)


def _trainer_of(model: Module) -> pl.Trainer | None:
    try:
        return model.trainer if isinstance(model, pl.LightningModule) else None
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def _unwrap(model: Module) -> Module:
    """The LightningModule inside strategy wrappers (DDP's ``.module``)."""
    while not isinstance(model, pl.LightningModule) and isinstance(getattr(model, "module", None), Module):
        model = model.module
    return model
