"""``AdaptiveMP``: the Lightning precision plugin, and the only code that talks to Lightning's precision hooks.

Compared with Lightning's ``MixedPrecision`` it

* resolves ``precision="auto"`` at setup from the device the model landed on, and honours an explicit
  ``"16-mixed"`` on CPU (Lightning's connector silently turns CPU fp16 into bf16);
* scales fp16 losses with :class:`~lightning_mp.AdaptiveLossScaler`;
* guards bf16 and fp32 too: a step whose gradients are not finite is skipped, so weights never turn NaN;
* keeps step-interval LR schedulers in step with the optimizer: a skipped step does not advance them;
* attributes every non-finite step to where it started (``plugin.overflow_events``, see diagnostics.py);
* runs chosen modules in fp32 (``fp32_modules``), and promotes modules to fp32 at run time when they keep
  overflowing or their low-precision kernel fails (``auto_fallback``), with an escalation ladder after that;
* saves its decisions (scaler state, counters, promotions) in the checkpoint and restores them before the
  first new step.

When nothing goes wrong the numerics are Lightning's: the same autocast context, the same unscale / clip /
step order, so weights match ``MixedPrecision`` bitwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections import deque
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_mp._grads import all_reduce, finite_sum, is_sharded, local, optimizer_grads
from lightning_mp.diagnostics import (
    LEVELS,
    Finding,
    ModuleStatistics,
    OverflowEvent,
    OverflowTracker,
    is_kernel_error,
    module_from_traceback,
)
from lightning_mp.fallback import FallbackManager, Promotion, enclosing
from lightning_mp.scaling import AdaptiveLossScaler, LossScaleFloorError

__all__ = ["AdaptiveMP", "cpu_has_native_bf16", "resolve_auto_precision"]

PrecisionName = Literal["auto", "16-mixed", "bf16-mixed", "32-true"]
_PRECISIONS = ("auto", "16-mixed", "bf16-mixed", "32-true")
_AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    try:
        capability = torch._C._cpu._get_cpu_capability()
        if capability.get("avx512_bf16") or capability.get("amx_bf16"):
            return True
    except (AttributeError, RuntimeError):
        pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
    return False


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_auto_precision(device_type: str) -> str:
    """What ``precision="auto"`` means on a device: bf16 where it is native, else fp16 on CUDA, else fp32."""
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


class _SkipAwareScheduler:
    """Forwards everything to a step-interval LR scheduler, but drops ``step()`` after a skipped optimizer step.

    Lightning steps schedulers after every optimizer step, even one the scaler skipped; a warm-up then ends
    early by as many steps as were skipped. Wrapping the scheduler (instead of patching it) keeps its
    ``state_dict`` free of our code, and ``__class__`` keeps ``isinstance`` checks working.
    """

    def __init__(self, scheduler: Any, step_was_skipped: Callable[[Optimizer], bool]) -> None:
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "_step_was_skipped", step_was_skipped)
        object.__setattr__(self, "suppressed_steps", 0)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - makes isinstance(proxy, StepLR) true, as unittest.mock does
        return type(self._scheduler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._step_was_skipped(self._scheduler.optimizer):
            object.__setattr__(self, "suppressed_steps", self.suppressed_steps + 1)
            return None
        return self._scheduler.step(*args, **kwargs)


class AdaptiveMP(Precision):
    """Mixed precision for Lightning: adaptive loss scaling, a non-finite guard, attribution and fp32 fallback.

    Use as ``Trainer(plugins=[AdaptiveMP()])`` and do not also pass ``Trainer(precision=...)``.

    Args:
        precision: ``"auto"`` (resolved at setup: bf16 where the device runs it natively, else fp16 on
            CUDA, else fp32), ``"16-mixed"``, ``"bf16-mixed"`` or ``"32-true"``.
        device: device type for autocast; ``None`` takes it from the model at setup.
        scaler: the :class:`AdaptiveLossScaler` for ``"16-mixed"``, or a dict of its arguments (built for the
            device at setup; what a YAML config gives); ``None`` builds a default one. Must be ``None`` for
            ``"bf16-mixed"`` and ``"32-true"``.
        fp32_modules: modules that always run in fp32: classes, fqn glob patterns (``"encoder.*.norm"``) or
            ``(module, fqn) -> bool`` filters. A pattern that matches nothing is an error at setup.
        auto_fallback: promote a module to fp32 when it is blamed for ``promote_after`` overflows within
            ``promote_window`` steps, or when its low-precision kernel raises (the step is then retried).
        fp32_defaults: also run ``fallback.DEFAULT_FP32_MODULES[precision]`` in fp32 (norms and softmax in
            fp16; nothing in bf16).
        guard_nonfinite: skip bf16/fp32 steps whose gradients are not finite (fp16 is always guarded by the
            scaler). Costs one reduction over the gradients per step; on a GPU it also reads one flag.
        promote_after: see ``auto_fallback``.
        promote_window: see ``auto_fallback``.
        watch_steps: optimizer steps the forward probe stays armed after an overflow it could not localize.
        max_consecutive_skips: skipped steps in a row that trigger the next rung of the escalation ladder.
        max_events: overflow events kept in memory (oldest dropped; ``overflow_counts`` keeps the totals).
        stats: per-module headroom/underflow statistics: ``"off"``, ``"cheap"`` (module outputs and parameter
            gradients) or ``"full"`` (also the gradients flowing into every module output).
        stats_every: sample the statistics on one optimizer step out of this many.
        attach_callbacks: add ``LossScaleMonitor``, ``OverflowDiagnostics`` and ``PrecisionReport`` to the
            Trainer at setup unless it already has them.

    Raises:
        ValueError: an unknown ``precision``, a ``scaler`` that is not an ``AdaptiveLossScaler``, a scaler
            given with bf16 / fp32, or any knob out of range.
    """

    # True where each rank holds only a shard of plain-tensor gradients (AdaptiveFSDPMP: FSDP1's flat
    # parameters): every non-finite flag is then combined across ranks before a step is taken or skipped.
    _sharded_gradients = False

    def __init__(
        self,
        precision: PrecisionName = "auto",
        device: str | None = None,
        scaler: AdaptiveLossScaler | None = None,
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
        stats_every: int = 25,
        attach_callbacks: bool = True,
    ) -> None:
        _check_arguments(locals())
        self.precision = precision
        self.device = device.split(":")[0] if device else None
        # A dict of scaler arguments (what a YAML config can say) is built for the device at setup.
        self._scaler_knobs = dict(scaler) if isinstance(scaler, Mapping) else {}
        self.scaler = scaler if isinstance(scaler, AdaptiveLossScaler) else None
        # A scaler we built ourselves may be rebuilt for the model's device at setup; the user's may not.
        self._own_scaler = self.scaler is None
        self.auto_fallback = auto_fallback
        self.guard_nonfinite = guard_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.fallback = FallbackManager(fp32_modules, fp32_defaults, promote_after, promote_window)
        self.tracker = OverflowTracker(watch_steps)
        self.statistics = ModuleStatistics(stats)
        self.stats_every = stats_every
        self.attach_callbacks = attach_callbacks
        self._events: deque[OverflowEvent] = deque(maxlen=max_events)
        self.overflow_counts: dict[str, int] = {}  # phase -> events, never truncated
        self._model: pl.LightningModule | None = None
        self._guard_skipped = 0
        self._steps = 0  # optimizer steps attempted (skipped ones included)
        self._consecutive_skips = 0
        self._floor_reached = False
        self._switch_to_bf16 = False  # requested by the escalation ladder, applied at the end of the step
        self._switched_to_bf16 = False
        self._last_step_skipped: dict[int, bool] = {}
        if precision == "16-mixed" and self.scaler is None:
            self.scaler = AdaptiveLossScaler(device=self.device or _default_device(), **self._scaler_knobs)
        if precision != "auto":
            self._resolve(self.device)

    # ------------------------------------------------------------------------------------- properties
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients, whatever the precision."""
        return self._guard_skipped + (self.scaler.skipped_steps if self.scaler is not None else 0)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES.get(self.precision)

    @property
    def stats_dtype(self) -> torch.dtype:
        """The format headroom and underflow are judged against: the autocast dtype, fp32 without one."""
        return self.autocast_dtype or torch.float32

    @property
    def overflow_events(self) -> list[OverflowEvent]:
        """Non-finite events, oldest first (the last ``max_events``)."""
        return list(self._events)

    @property
    def fp32_modules(self) -> list[str]:
        """Fully qualified names of the modules running in fp32 now (static, default and promoted)."""
        return list(self.fallback.promotions)

    @property
    def promotions(self) -> list[Promotion]:
        """Why each module in ``fp32_modules`` runs in fp32."""
        return list(self.fallback.promotions.values())

    # ------------------------------------------------------------------------------------------ setup
    def _resolve(self, device: str | None) -> None:
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
        if self.precision == "16-mixed":
            if self.scaler is None or (self._own_scaler and self.scaler._device != device):
                self.scaler = AdaptiveLossScaler(device=device, **self._scaler_knobs)
                self._own_scaler = True
            elif self.scaler._device != device:
                raise ValueError(
                    f"AdaptiveMP: the scaler was built for device {self.scaler._device!r} but the model runs on"
                    f" {device!r}; pass AdaptiveLossScaler(device={device!r}, ...)."
                )
            if self.scaler.on_floor is None:
                # Only note it here (we are inside scaler.update()); _after_step escalates once the event
                # of this step is recorded, so the ladder sees what this step blamed.
                self.scaler.on_floor = lambda scaler: setattr(self, "_floor_reached", True)

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        # Called by every strategy after the model is on its device and the optimizers exist. The model may
        # be wrapped (DDP): islands are applied in place on the LightningModule inside.
        if self.device is None or self.precision == "auto":
            param = next(model.parameters(), None)
            self._resolve(self.device or (param.device.type if param is not None else "cpu"))
        self._model = _unwrap(model)
        if self.scaler is not None and self._sharded_gradients:
            self.scaler.sharded_gradients = True
        self.fallback.setup(self._model, self.precision, self.device)
        if self.attach_callbacks and self._model._trainer is not None:
            _attach_default_callbacks(self._model.trainer)
        if self._model._trainer is None or self._model.trainer.training:
            self.tracker.order.record(self._model)  # removed after the first optimizer step (or at teardown)
        lr_schedulers = [self._skip_aware(config) for config in lr_schedulers]
        return model, optimizers, lr_schedulers

    @override
    def teardown(self) -> None:
        """Remove every hook we may still hold (an interrupted run, or a run with no optimizer step)."""
        self.tracker.order.stop()
        self.tracker.probe.disarm()
        if self.statistics.active and self._model is not None:
            self.statistics.collect(self._model, 1.0, self.stats_dtype)
        super().teardown()

    def _skip_aware(self, config: Any) -> Any:
        if not isinstance(config, LRSchedulerConfig) or config.interval != "step" or config.reduce_on_plateau:
            return config
        if not isinstance(config.scheduler, _SkipAwareScheduler):
            config.scheduler = _SkipAwareScheduler(config.scheduler, self._step_was_skipped)
        return config

    def _step_was_skipped(self, optimizer: Optimizer) -> bool:
        return self._last_step_skipped.get(id(optimizer), False)

    # -------------------------------------------------------------------------------------- autocast
    def autocast_context_manager(self) -> contextlib.AbstractContextManager:
        if self.precision == "auto" or self.device is None:
            self._resolve(self.device or "cpu")  # used outside a Trainer, before setup
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False as in Lightning's MixedPrecision: same kernels, same numbers.
        return torch.autocast(self.device, dtype=dtype, cache_enabled=False)

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast for training, validation, test and predict steps."""
        with self.autocast_context_manager():
            yield

    @override
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        self.tracker.start_micro_step()
        if self._model is not None and self._steps % self.stats_every == 0:
            self.statistics.start(self._model)  # a sampled step: hooks live for this step only
        with self.forward_context():
            yield

    @override
    @contextlib.contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        try:
            with self.forward_context():
                yield
        except (RuntimeError, NotImplementedError) as error:
            # A validation step cannot be retried from here: promote the module and skip this one batch.
            if not self._promote_after_kernel_error(error):
                raise
            rank_zero_warn(f"AdaptiveMP: skipped one validation batch after a kernel error ({_first_line(error)}).")

    @override
    def convert_input(self, data: Any) -> Any:
        if self._model is not None and self._model._trainer is not None and self._model.trainer.training:
            self.tracker.observe_input(data)
        return data

    # -------------------------------------------------------------------------------------- backward
    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        self.tracker.observe_loss(tensor)
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        # Lightning's base hook (on_before_backward), named explicitly: a subclass that is also another
        # Precision (AdaptiveFSDPMP is an FSDPPrecision) must not have that class scale the loss again.
        return Precision.pre_backward(self, tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizable,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if isinstance(optimizer, LBFGS) and self.scaler is not None:
            raise MisconfigurationException("AMP and the LBFGS optimizer are not compatible.")
        if isinstance(optimizer, LBFGS) or (self.scaler is None and not self.guard_nonfinite):
            # Lightning's own path. LBFGS re-evaluates the closure inside step(): there is no point between
            # backward and the update where a guard could look, so bf16/fp32 LBFGS runs unguarded, as in Lightning.
            try:
                return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
            finally:
                self._collect_statistics(scale=1.0)
        self._steps += 1
        try:
            return self._optimizer_step(optimizer, model, closure, **kwargs)
        finally:
            self.tracker.end_step()
            if self._switch_to_bf16:
                self._apply_bf16_switch()

    def _optimizer_step(self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any):
        closure_result = self._run_closure(closure)
        # In automatic optimization a training_step that returned None skipped backward: nothing to step.
        skip_backward = closure_result is None and model.automatic_optimization
        if self.scaler is not None and not skip_backward and not _optimizer_handles_unscaling(optimizer):
            # Unscale before on_before_optimizer_step and clipping, so both see true gradients.
            # Optimizers that unscale inside step() (fused Adam) cannot be clipped; see clip_gradients.
            self.scaler.unscale_(optimizer)
        # Before clipping: the statistics describe the gradients the backward produced.
        self._collect_statistics(scale=self.scaler.get_scale() if self.scaler is not None else 1.0)
        self._after_closure(model, optimizer)
        if skip_backward:
            return closure_result

        if self.scaler is not None:
            skipped_before = self.scaler.skipped_steps
            # The scaler skips optimizer.step() itself when the gradients are not finite.
            step_output = self.scaler.step(optimizer, **kwargs)
            skipped = self.scaler.skipped_steps > skipped_before
            finding = self._attribute() if skipped else None
            if finding is not None and finding.phase != "backward":
                self.scaler.excuse_overflow()  # lowering the scale cannot fix a bad batch or a forward overflow
            self.scaler.update()
            self._after_step(optimizer, finding)
            return step_output

        # bf16 / fp32: no scaler, so check the gradients ourselves (after clipping: what would be applied).
        skipped = self._gradients_nonfinite(optimizer)
        if skipped:
            self._guard_skipped += 1
            finding = self._attribute()
        else:
            finding = None
            optimizer.step(**kwargs)
        self._after_step(optimizer, finding)
        # What optimizer.step(closure) would have returned: the closure's result.
        return closure_result

    def _collect_statistics(self, scale: float) -> None:
        if self.statistics.active and self._model is not None:
            self.statistics.collect(self._model, scale, self.stats_dtype)

    def _run_closure(self, closure: Callable[[], Any]) -> Any:
        """Run the closure; a low-precision kernel failure promotes its module to fp32 and retries."""
        while True:
            try:
                return closure()
            except (RuntimeError, NotImplementedError) as error:
                if not self._promote_after_kernel_error(error):
                    raise

    def _promote_after_kernel_error(self, error: BaseException) -> bool:
        if not (self.auto_fallback and self.autocast_dtype is not None and is_kernel_error(error)):
            return False
        fqn = module_from_traceback(error, self._model) if self._model is not None else None
        if fqn is None or not self.fallback.promote(
            self._model, fqn, "kernel error", self.device, self._steps, _first_line(error)
        ):
            return False
        rank_zero_warn(
            f"AdaptiveMP: {fqn} runs in fp32 from now on: its {self.precision} kernel failed ({_first_line(error)})."
        )
        return True

    def _gradients_nonfinite(self, optimizer: Optimizer) -> bool:
        grads = optimizer_grads(optimizer)
        if not grads:
            return False
        # One streaming sum per gradient (inf and NaN propagate), one flag read on the host. Sharded (DTensor)
        # gradients are checked shard by shard, so the ranks agree on the flag before anyone skips.
        flag = (~torch.isfinite(finite_sum(grads, local(grads[0]).device))).float().reshape(1)
        if self._sharded_gradients or is_sharded(grads):
            all_reduce(flag)
        return bool(flag.item())

    # -------------------------------------------------------------------------- attribution, fallback
    def _attribute(self) -> Finding | None:
        return self.tracker.attribute(self._model) if self._model is not None else None

    def _after_step(self, optimizer: Optimizer, finding: Finding | None) -> None:
        skipped = finding is not None
        self._last_step_skipped[id(optimizer)] = skipped
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        if finding is None:
            return
        actions = ["skipped"]
        if self.scaler is not None:
            actions.append(_SCALER_ACTIONS.get(self.scaler.last_action, self.scaler.last_action or ""))
        if self._should_blame(finding) and self.fallback.policy.blame(finding.module, self._steps):
            if self.fallback.promote(self._model, finding.module, "overflow", self.device, self._steps, finding.phase):
                actions.append(f"promoted {finding.module} to fp32")
                rank_zero_warn(
                    f"AdaptiveMP: {finding.module} runs in fp32 from now on: repeated {finding.phase} overflows."
                )
        scale = self.scaler.get_scale() if self.scaler is not None else None
        event = OverflowEvent(
            self._steps,
            finding.phase,
            finding.module,
            finding.kind,
            finding.dtype,
            scale,
            "; ".join(a for a in actions if a),
        )
        self._events.append(event)
        self.overflow_counts[finding.phase] = self.overflow_counts.get(finding.phase, 0) + 1
        rung = None
        if self._floor_reached:
            self._floor_reached = False
            rung = self._escalate("the loss scale is at its floor")
        elif self._consecutive_skips >= self.max_consecutive_skips:
            rung = self._escalate(f"{self._consecutive_skips} optimizer steps in a row were skipped")
        if rung is not None:
            self._events[-1] = dataclasses.replace(event, action=f"{event.action}; escalation: {rung}")

    def _should_blame(self, finding: Finding) -> bool:
        """Blame layers, never bad batches or bad losses; a backward overflow only when scaling cannot help."""
        if not self.auto_fallback or finding.module is None or finding.phase in ("input", "loss"):
            return False
        if finding.phase == "backward" and self.scaler is not None:
            return self.scaler.get_scale() <= self.scaler.config.floor
        return True

    def _escalate(self, why: str) -> str:
        """The escalation ladder, one rung per call: promote the blamed module or its enclosing block, then
        switch fp16 to bf16 where the device runs bf16 natively, then stop with a diagnosis."""
        self._consecutive_skips = 0
        if self.scaler is not None:
            self.scaler.policy.floor_hits = 0
        blamed = next((e.module for e in reversed(self._events) if e.module is not None), None)
        if blamed is not None and self._model is not None:
            names = [fqn for fqn, _ in self._model.named_modules() if fqn]
            target = blamed if blamed not in self.fallback.promotions else enclosing(blamed, names)
            if target is not None and self.fallback.promote(
                self._model, target, "escalation", self.device, self._steps, why
            ):
                rank_zero_warn(f"AdaptiveMP escalation: {why}; {target} runs in fp32 from now on.")
                return f"promoted {target} to fp32"
        if self.precision == "16-mixed" and resolve_auto_precision(self.device) == "bf16-mixed":
            self._switch_to_bf16 = True
            rank_zero_warn(f"AdaptiveMP escalation: {why}; switching from fp16 to bf16 (same range as fp32).")
            return "switched fp16 to bf16"
        recent = ", ".join(f"step {e.step} {e.phase} {e.module or '-'} {e.kind}" for e in list(self._events)[-5:])
        raise LossScaleFloorError(
            f"AdaptiveMP gave up: {why}, and neither fp32 promotion nor a switch to bf16 helped. Recent events:"
            f" {recent or 'none'}. Non-finite values at every scale usually mean diverging training: lower the"
            " learning rate, clip gradients, or check the data and the loss."
        )

    def _apply_bf16_switch(self) -> None:
        self._switch_to_bf16 = False
        if self.scaler is not None:
            self._guard_skipped += self.scaler.skipped_steps  # keep the count; the scaler goes away
        self.scaler = None
        self.precision = "bf16-mixed"
        self._switched_to_bf16 = True

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val > 0 and _optimizer_handles_unscaling(optimizer):
            raise RuntimeError(
                f"The current optimizer, {type(optimizer).__qualname__}, does not allow for gradient clipping"
                " because it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer?"
            )
        super().clip_gradients(optimizer=optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "switched_to_bf16": self._switched_to_bf16,
            "guard_skipped_steps": self._guard_skipped,
            "steps": self._steps,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "promotions": self.fallback.state_dict(),
            "events": [e.to_dict() for e in self._events],
            "overflow_counts": dict(self.overflow_counts),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after setup and before the first new step: the precision is resolved and the
        # model known, so promotions are re-applied before the first new forward.
        saved = state_dict.get("precision")
        if state_dict.get("switched_to_bf16") and self.precision == "16-mixed":
            self._apply_bf16_switch()  # the ladder moved the run to bf16; stay there
        if saved not in (None, self.precision):
            rank_zero_warn(
                f"Resuming a {saved!r} checkpoint with AdaptiveMP(precision={self.precision!r}): the saved"
                " loss-scaler state does not apply and is ignored; counters and promotions are kept."
            )
        self._guard_skipped = int(state_dict.get("guard_skipped_steps", 0))
        self._steps = int(state_dict.get("steps", 0))
        scaler_state = state_dict.get("scaler")
        if self.scaler is not None and scaler_state and saved == self.precision:
            self.scaler.load_state_dict(scaler_state)
        self._events.clear()
        self._events.extend(OverflowEvent(**e) for e in state_dict.get("events", ()))
        self.overflow_counts = dict(state_dict.get("overflow_counts", {}))
        if self._model is not None:
            self.fallback.load_state_dict(self._model, state_dict.get("promotions", ()), self.device)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run started with Lightning's MixedPrecision keeps its GradScaler state under "MixedPrecision":
        # carry the scale over so switching to AdaptiveMP does not restart the scale search.
        if type(self).__qualname__ not in checkpoint and self.scaler is not None:
            legacy = checkpoint.get("MixedPrecision")
            if legacy:
                self.scaler.load_state_dict(legacy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, device={self.device!r}, scaler={self.scaler!r})"


_SCALER_ACTIONS = {
    "held": "",
    "grew": "scale grew",
    "growth_refused": "",
    "shrank_ahead": "",
    "tolerated": "scale kept (hysteresis)",
    "backed_off": "scale backed off",
    "reverted": "failed growth reverted",
    "floor": "scale at its floor",
    "excused": "scale kept (not a scaling problem)",
}


def _attach_default_callbacks(trainer: pl.Trainer) -> None:
    """Give a Trainer that only has AdaptiveMP the monitor, the diagnostics and the report.

    Strategies call ``connect`` after the callbacks' ``setup`` but before ``on_fit_start``, so callbacks
    added here receive every hook they use. They go before the checkpoint callbacks (Lightning runs those
    last so that a checkpoint holds every other callback's state for the step just taken), and a run
    resumed from a checkpoint gives them back their state, which Lightning restored for the other
    callbacks before this point.
    """
    from lightning.pytorch.callbacks import Checkpoint

    from lightning_mp.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport

    loaded = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None) or {}
    saved_states = loaded.get("callbacks", {})
    for cls in (LossScaleMonitor, OverflowDiagnostics, PrecisionReport):
        if any(isinstance(cb, cls) for cb in trainer.callbacks):
            continue
        callback = cls()
        if callback.state_key in saved_states:
            callback.load_state_dict(saved_states[callback.state_key])
        first_checkpoint = next(
            (i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)), len(trainer.callbacks)
        )
        trainer.callbacks.insert(first_checkpoint, callback)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _unwrap(model: Module) -> Module:
    """The LightningModule inside strategy wrappers (DDP's ``.module``)."""
    while not isinstance(model, pl.LightningModule) and isinstance(getattr(model, "module", None), Module):
        model = model.module
    return model


def _check_arguments(args: dict[str, Any]) -> None:
    precision, device, scaler = args["precision"], args["device"], args["scaler"]
    if precision not in _PRECISIONS:
        raise ValueError(f"AdaptiveMP(precision={precision!r}) is invalid: precision must be one of {_PRECISIONS}.")
    if device is not None and not isinstance(device, str):
        raise ValueError(
            f"AdaptiveMP(device={device!r}) is invalid: device must be None or a device type string"
            " such as 'cuda' or 'cpu'."
        )
    if scaler is not None and not isinstance(scaler, (AdaptiveLossScaler, Mapping)):
        raise ValueError(
            f"AdaptiveMP(scaler={scaler!r}) is invalid: scaler must be None, an AdaptiveLossScaler"
            " (AdaptiveLossScaler(policy='dynamic', hysteresis=1, min_scale=None, max_scale=None)"
            " reproduces torch.amp.GradScaler) or a dict of its arguments."
        )
    if isinstance(scaler, Mapping):
        if "device" in scaler:
            raise ValueError("AdaptiveMP(scaler={'device': ...}) is invalid: the device is taken from AdaptiveMP.")
        AdaptiveLossScaler("cpu", **scaler)  # validate every knob now, naming the bad one
    if scaler is not None and precision in ("bf16-mixed", "32-true"):
        raise ValueError(
            f"AdaptiveMP(precision={precision!r}, scaler=...) is invalid: a loss scaler is only used with"
            " precision='16-mixed' (or 'auto'); pass scaler=None."
        )
    if args["stats"] not in LEVELS:
        raise ValueError(f"AdaptiveMP(stats={args['stats']!r}) is invalid: must be one of {LEVELS}.")
    for name in ("auto_fallback", "fp32_defaults", "guard_nonfinite", "attach_callbacks"):
        if not isinstance(args[name], bool):
            raise ValueError(f"AdaptiveMP({name}={args[name]!r}) is invalid: must be True or False.")
    for name in (
        "promote_after",
        "promote_window",
        "watch_steps",
        "max_consecutive_skips",
        "max_events",
        "stats_every",
    ):
        value = args[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"AdaptiveMP({name}={value!r}) is invalid: must be an integer >= 1.")
