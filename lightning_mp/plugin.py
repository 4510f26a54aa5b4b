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
from lightning_utilities import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_mp._compat import (
    after_closure,
    convert_fp_tensor,
    muted_logging,
    muted_step_counting,
    optimizer_handles_unscaling,
    redirected_manual_backward,
    restore_weight_averaging,
    retarget_scheduler,
    skip_weight_averaging_on_skipped_steps,
    unwrap_training_step,
    wrap_training_step,
)
from lightning_mp.formats import PrecisionName, cpu_has_native_bf16, resolve_auto_precision
from lightning_mp.options import KNOBS, PluginOptions, args_doc
from lightning_mp.reporting.warnings import EventWarnings
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.schedulers import skip_aware
from lightning_mp.shell import CoreView
from lightning_mp.step.core import PrecisionCore
from lightning_mp.step.decisions import first_line
from lightning_mp.weights.care import clip_norm_in_fp32

__all__ = ["AdaptiveMP", "adaptive_plugin", "cpu_has_native_bf16", "resolve_auto_precision"]


class AdaptiveMP(CoreView, Precision):
    __doc__ = f"""Mixed precision for Lightning: adaptive loss scaling, a non-finite guard, attribution and fp32
    fallback.

    Use as ``Trainer(plugins=[AdaptiveMP()])`` and do not also pass ``Trainer(precision=...)``.

{args_doc(KNOBS)}

    Raises:
        ValueError: an unknown ``precision``, a ``scaler`` of another type, a scaler given with bf16 / fp32, or
            any knob out of range.
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
        low_bit_recipe: str = "tensorwise",
        low_bit_modules: Any = None,
        bf16_modules: Any = (),
        master_weights: Any = "auto",
    ) -> None:
        options = PluginOptions(**{name: value for name, value in locals().items() if name in KNOBS})
        self.core = PrecisionCore(options, warn=rank_zero_warn)
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
        self.core.convert_weights(_unwrap(module))  # "bf16-true" / "16-true": in place (DDP discards the return)
        return module

    @override
    def convert_input(self, data: Any) -> Any:
        """Floating-point inputs in the weights' dtype with low-precision weights, as Lightning's
        ``HalfPrecision``; left alone under autocast (as ``MixedPrecision``)."""
        dtype = self.core.setting.weights_dtype
        if dtype is None:
            return data
        return apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=dtype)

    @override
    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return self.core.setting.init_context()  # ``Trainer.init_module()``

    @override
    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.core.setting.init_context()

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
        if fitting:  # the remedy for low-precision weights, and the optimizer care checks
            adopted = self.core.adopt_optimizers(list(optimizers), keep=_keep_optimizers(lr_schedulers))
            for old, new in zip(optimizers, adopted):
                if new is not old:  # a library optimizer applies the remedy: schedulers follow it
                    for config in lr_schedulers:
                        if getattr(config.scheduler, "optimizer", None) is old:
                            retarget_scheduler(config.scheduler, new)
            optimizers = adopted
        if self._trainer is not None:
            self._keep_training_steps(self._trainer, module)
            # Manual optimization toggles requires_grad between optimizers: a replay starts from the batch's flags.
            self.core.replay.track_flags(None if module.automatic_optimization else module)
        if self.core.options.attach_callbacks and self._trainer is not None:
            from lightning_mp.reporting.callbacks import attach_default_callbacks  # they import this module

            self._attached = attach_default_callbacks(self._trainer)
        lr_schedulers = [skip_aware(config, self.core) for config in lr_schedulers]
        if self._trainer is not None:  # EMAWeightAveraging & co. average real steps only
            self._averaging = skip_weight_averaging_on_skipped_steps(
                self._trainer.callbacks, self.core.step_was_skipped
            )
        return model, optimizers, lr_schedulers

    @override
    def teardown(self) -> None:
        if self._trainer is not None:
            unwrap_training_step(self._trainer.strategy)  # our wrapper (see _keep_training_steps)
        restore_weight_averaging(self._averaging)
        self._averaging = []
        self.core.teardown()
        super().teardown()

    # ---------------------------------------------------------------------------------------- replay
    def _keep_training_steps(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Let the core replay or re-run a step: every ``training_step`` call (with the batch already on the
        device) keeps how to run it again and its batch is observed. Only references to its arguments are kept."""

        def keep(*args: Any, **kwargs: Any) -> None:
            batch = args[0] if args else kwargs.get("batch")  # as the LightningModule's training_step gets it
            self.core.keep_micro_batch(functools.partial(self._replay_micro_batch, module, args, kwargs), batch)

        wrap_training_step(trainer.strategy, keep)

    def _replay_micro_batch(
        self, module: pl.LightningModule, args: tuple, kwargs: dict, backward: Callable[[Tensor], None]
    ) -> None:
        """Run one micro-batch's ``training_step`` again, handing its loss to ``backward`` where Lightning's
        loop would call backward. Logging is muted and optimizer steps are never taken."""
        undo = muted_step_counting(_lightning_optimizers(module))
        manual = (
            contextlib.nullcontext() if module.automatic_optimization else redirected_manual_backward(module, backward)
        )
        try:
            with manual, muted_logging(module):
                output = module.training_step(*args, **kwargs)
            if module.automatic_optimization:
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if isinstance(loss, Tensor):
                    accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
                    backward(loss / accumulate if accumulate > 1 else loss)
        finally:
            undo()

    # -------------------------------------------------------------------------------------- autocast
    def autocast_context_manager(self) -> contextlib.AbstractContextManager:
        return self.core.setting.autocast()

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast for training, validation, test and predict steps."""
        with self.core.setting.autocast():
            yield

    @override
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        self.core.begin_micro_batch()
        with self.core.training_context():
            yield

    @override
    @contextlib.contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        try:
            with self.core.setting.autocast():
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
    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        self.core.after_backward()  # fp32 masters: each micro-batch's gradients accumulate in fp32
        return super().post_backward(tensor, module)

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
        scaled = core.setting.format.scaled
        lbfgs = isinstance(optimizer, LBFGS)
        if lbfgs and scaled:
            raise MisconfigurationException("AMP and the LBFGS optimizer are not compatible.")
        try:
            if lbfgs or (not scaled and not core.options.guard_nonfinite):
                # Lightning's own path. LBFGS re-evaluates the closure inside step(): there is no point between
                # backward and the update where a guard could look, so bf16/fp32 LBFGS runs unguarded, as in
                # Lightning.
                step = functools.partial(super().optimizer_step, optimizer, model=model, closure=closure, **kwargs)
                return core.unguarded_step(step, optimizer)
            automatic = model.automatic_optimization
            outcome = core.optimizer_step(
                optimizer,
                closure,
                automatic=automatic,
                # An fp16 overflow born in the backward runs the step again at a lower scale (automatic only).
                rerun=_Rerun(self, model, closure, optimizer) if automatic else None,
                before_update=functools.partial(after_closure, self, model, optimizer),  # then clipping
                **kwargs,
            )
            # What Lightning returns: GradScaler.step's output in fp16, else what optimizer.step(closure) would.
            return outcome.output if scaled and outcome.stepped else outcome.closure_result
        finally:
            for message in self._warnings.new(core.ledger):
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
        if gradient_clip_algorithm == GradClipAlgorithmType.NORM and clip_norm_in_fp32(optimizer, clip_val):
            return
        super().clip_gradients(optimizer=optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after setup and before the first new step: promotions apply to its forward.
        self.core.load_state_dict(state_dict)
        self._warnings.told_up_to(self.core.ledger)  # a resumed run does not repeat its earlier warnings

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


def _keep_optimizers(lr_schedulers: list[Any]) -> str | None:
    """Why the user's optimizers must not be replaced by a library's, or None: a scheduler that cycles momentum
    (OneCycleLR, CyclicLR) writes ``betas`` / ``momentum`` into param groups that optimi names differently."""
    for config in lr_schedulers:
        if getattr(config.scheduler, "cycle_momentum", False):
            return f"{type(config.scheduler).__name__} cycles the optimizer's momentum, which optimi names differently"
    return None


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


class _Rerun:
    """Runs a step's forward and backward again with ``self.log`` muted, for a rescue: a rescued step's metrics
    are logged once, by its first run.

    One micro-batch (``runs`` empty): Lightning's closure (training_step, zero_grad, backward); returns its
    result, which replaces the first run's. An accumulated step: ``runs``, each kept micro-batch's
    ``training_step`` (see ``StepReplay``), each loss through the strategy's backward as Lightning's loop does
    (normalised by ``accumulate_grad_batches``, ``on_before_backward`` / ``on_after_backward`` called), after
    zeroing the gradients the first attempt summed.
    """

    def __init__(self, plugin: AdaptiveMP, module: pl.LightningModule, closure: Callable[[], Any], optimizer) -> None:
        self.plugin, self.module, self.closure, self.optimizer = plugin, module, closure, optimizer

    def __call__(self, runs: list[Callable[[Callable[[Tensor], None]], None]]) -> Any:
        if runs:
            strategy = self.module.trainer.strategy
            self.optimizer.zero_grad()
            for run in runs:
                with self.plugin.core.micro_batch():
                    run(lambda loss: strategy.backward(loss, self.optimizer))
            return None
        with muted_logging(self.module):
            return self.closure()


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
