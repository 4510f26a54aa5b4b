"""``AdaptiveMP`` for Lightning Fabric: the same :class:`~.core.PrecisionCore` as the Trainer plugin, under
Fabric's precision hooks.

The name follows Fabric's own convention (``lightning.fabric.plugins.MixedPrecision`` next to
``lightning.pytorch.plugins.MixedPrecision``)::

    from lightning_mp.fabric import AdaptiveMP

    amp = AdaptiveMP("16-mixed")
    fabric = Fabric(accelerator="cuda", plugins=[amp])
    model, optimizer = fabric.setup(model, optimizer)
    for batch in loader:
        loss = loss_fn(model(batch))          # the first forward after a step begins the next step
        fabric.backward(loss)                 # the scaled loss (fp16); any number per step (accumulation)
        optimizer.step()                      # unscale, guard, step or skip, attribute, promote
        optimizer.zero_grad()
        fabric.log_dict(amp.metrics())        # loss scale, skipped steps, headroom (what the callbacks log)
    amp.report("reports/")                    # precision_report.{json,md,png}
    fabric.save("ckpt.pt", {"model": model, "optimizer": optimizer, "amp": amp})  # state round-trips

When nothing goes wrong the numerics are Fabric's ``MixedPrecision``: the same autocast, the same casts of the
inputs and outputs, the same scale / unscale / step order, so the weights match it bit for bit.

What differs from the Trainer plugin, because Fabric runs the user's loop: a bad step is attributed by the
cheap attribution and the forward probe, not replayed, and an fp16 overflow is skipped, not rescued (there is
no ``training_step`` to run again); one model
per plugin (``fabric.setup`` once); there are no callbacks, so :meth:`AdaptiveMP.metrics` and
:meth:`AdaptiveMP.report` give what they would log and write, and a step's warning (where it went non-finite,
once per place) is issued from ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import Optimizable
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_mp._compat import convert_fp_tensor, optimizer_handles_unscaling
from lightning_mp.formats import PrecisionName
from lightning_mp.options import FABRIC_KNOBS, PluginOptions, args_doc
from lightning_mp.reporting.report import (
    build_report,
    render_table,
    run_metrics,
    sampled_metrics,
    write_report,
)
from lightning_mp.reporting.warnings import EventWarnings
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.shell import CoreView
from lightning_mp.step.core import PrecisionCore

__all__ = ["AdaptiveMP"]


class AdaptiveMP(CoreView, Precision):
    __doc__ = f"""Mixed precision for Lightning Fabric: adaptive loss scaling, a non-finite guard, attribution and
    fp32 fallback. Use as ``Fabric(plugins=[AdaptiveMP(...)])`` and do not also pass ``Fabric(precision=...)``.

    The knobs of the Trainer's :class:`lightning_mp.AdaptiveMP` but those Fabric cannot have (no callbacks, no
    FSDP1, no ``training_step`` to replay or re-run; see the module docstring).

{args_doc(FABRIC_KNOBS)}
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
        low_bit_recipe: str = "tensorwise",
        low_bit_modules: Any = None,
        bf16_modules: Any = (),
        master_weights: Any = "auto",
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name in FABRIC_KNOBS}
        options = PluginOptions(
            **arguments, attach_callbacks=False, sharded_gradients=False, replay=False, rescue=False
        )
        self.core = PrecisionCore(options, warn=rank_zero_warn)
        self._warnings = EventWarnings()
        self._module: Module | None = None  # the model given to fabric.setup; the core takes it at first use
        self._set_up = False
        self._micro_open = False  # a micro-batch's forward ran and its backward has not yet
        self._held: dict[int, list] = {}  # id(optimizer) -> a bad step's (param, grad), held back from the clip

    # ------------------------------------------------------------------------------------------ setup
    @override
    def convert_module(self, module: Module) -> Module:
        # Fabric calls this before it moves the model to its device: the core takes the model (and resolves
        # "auto" from its device) at its first use, when the parameters are where they train.
        if self._module is not None and self._module is not module:
            raise ValueError(
                "lightning_mp.fabric.AdaptiveMP drives one model per Fabric, but fabric.setup was called with a"
                f" second one ({type(module).__name__}); set up one nn.Module that holds every trained network."
            )
        self._module = module
        self._wrap_forward(module)
        self.core.convert_weights(module)  # "bf16-true" / "16-true"
        return module

    @override
    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return self.core.setting.init_context()  # ``fabric.init_module()``

    @override
    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.core.setting.init_context()

    def _ensure_set_up(self) -> None:
        if not self._set_up and self._module is not None:
            self._set_up = True
            self.core.setup(self._module)

    def _wrap_forward(self, module: Module) -> None:
        """A low-precision kernel that raises in the forward promotes its module to fp32 and the forward runs
        again (the Trainer plugin retries the closure; Fabric has none)."""
        if "forward" in module.__dict__:
            return  # already ours (a second setup of the same model), or the user's own instance attribute
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.core.run_closure(lambda: original(*args, **kwargs), training=self._training())

        module.forward = forward

    @override
    def teardown(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("forward", None)
        self.core.teardown()

    # -------------------------------------------------------------------------------------- forward
    def _training(self) -> bool:
        return torch.is_grad_enabled() and self._module is not None and self._module.training

    def _begin_micro_batch(self) -> None:
        """Fabric has no micro-batch: one is the training forwards until the next backward."""
        if not self._micro_open:
            self.core.begin_micro_batch()
            self._micro_open = True

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        self._ensure_set_up()
        if not self._training():
            with self.core.setting.autocast():
                yield
            return
        self._begin_micro_batch()
        with self.core.training_context():
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        """Floating-point inputs in the autocast dtype, as Fabric's ``MixedPrecision`` does (in the weights' dtype
        with low-precision weights, as ``HalfPrecision``); observed in training (a value the cast turned into inf is
        an ``input`` event)."""
        self._ensure_set_up()
        dtype = self.core.setting.input_dtype
        if dtype is not None:
            data = apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=dtype)
        if self._training():
            self.core.observe_input(data)
        return data

    @override
    def convert_output(self, data: Any) -> Any:
        if self.core.setting.input_dtype is None:
            return data
        return apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype())

    # ------------------------------------------------------------------------------------- backward
    @override
    def backward(self, tensor: Tensor, model: Module | None, *args: Any, **kwargs: Any) -> None:
        self._ensure_set_up()
        if not self.core.step_open:
            self._begin_micro_batch()  # a backward with no forward through the Fabric model in this step
        super().backward(self.core.scale_loss(tensor), model, *args, **kwargs)
        self.core.after_backward()  # fp32 masters: each micro-batch's gradients accumulate in fp32
        self._micro_open = False  # the next training forward is the next micro-batch

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """What ``fabric.clip_gradients`` calls first: unscale once per step (then statistics are sampled).

        The clip comes next and, with Fabric's default ``error_if_nonfinite=True``, raises on a non-finite norm
        before ``optimizer.step()`` could skip the step. So a bad step's gradients are held back until then: the
        clip sees none (and returns a norm of 0), and ``optimizer.step()`` puts them back, skips the step and
        attributes it as usual. The same in every precision.
        """
        if self.core.setting.format.scaled and optimizer_handles_unscaling(optimizer):
            raise NotImplementedError("Gradient clipping is not implemented for optimizers handling the unscaling.")
        if self.core.prepare_clipping(optimizer):
            held = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._held[id(optimizer)] = [(p, p.grad) for p in held]
            for p in held:
                p.grad = None

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        self._ensure_set_up()
        try:
            if isinstance(optimizer, LBFGS):
                if self.core.setting.format.scaled:
                    raise TypeError("AMP and the LBFGS optimizer are not compatible.")
                # It re-evaluates its closure inside step(): nothing to guard.
                return self.core.unguarded_step(functools.partial(super().optimizer_step, optimizer, **kwargs))
            closure = kwargs.pop("closure", None)
            for param, grad in self._held.pop(id(optimizer), ()):
                param.grad = grad  # a bad step's gradients, held back from the clip (see unscale_gradients)
            step_closure = functools.partial(_with_grad, closure) if closure is not None else None
            return self.core.optimizer_step(optimizer, step_closure, automatic=False, **kwargs).output
        finally:
            self._micro_open = False
            for message in self._warnings.new(self.core.ledger):
                rank_zero_warn(message)

    # -------------------------------------------------------------------------------- what it reports
    def metrics(self, top_k: int = 10) -> dict[str, float]:
        """What the Trainer's callbacks log, for ``fabric.log_dict(amp.metrics())``: ``precision/loss_scale``,
        ``precision/skipped_steps``, ``precision/overflow_events``, ``precision/fp32_modules`` and, once
        statistics were sampled, ``precision/headroom_bits/<fqn>`` and ``precision/underflow/<fqn>`` for the
        ``top_k`` modules with the least headroom. Host numbers only: no device sync."""
        return {**run_metrics(self), **sampled_metrics(self, top_k)}

    def report(self, directory: str | Path = ".", console: bool = False) -> dict[str, Path]:
        """Write ``precision_report.{json,md,png}`` into ``directory`` (what the Trainer's ``PrecisionReport``
        writes at the end of fit); print the summary table with ``console=True``. Returns the paths."""
        document = build_report(self, self.scale_history)
        paths = write_report(document, directory)
        if console:
            from rich.console import Console

            Console().print(render_table(document))
        return paths

    # ------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ensure_set_up()  # promotions apply to the model: it must be the core's first
        self.core.load_state_dict(state_dict)
        self._warnings.told_up_to(self.core.ledger)  # a resumed run does not repeat its earlier warnings

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, device={self.device!r}, scaler={self.scaler!r})"


def _with_grad(closure: Any) -> Any:
    with torch.enable_grad():
        return closure()
