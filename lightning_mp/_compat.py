"""The fence: every private torch or Lightning name this package still uses, in one place, each with why.

A private name can change in any release. Everything below either has no public alternative or is the price of
a budget we hold (no host-device synchronisation beyond the one ``GradScaler.step`` already does).
``tests/unit/test_compat.py`` pins each entry, so an upgrade that renames or reshapes one fails there, loudly
and by name, instead of somewhere deep in a training run.

torch
    ``torch.amp.grad_scaler.OptState``, ``_refresh_per_optimizer_state``
        GradScaler's per-optimizer bookkeeping, which ``AdaptiveLossScaler.update`` resets as GradScaler does.
    ``GradScaler._unscale_grads_``, ``_maybe_opt_step``, ``_lazy_init_scale_growth_tracker``,
    ``_get_growth_tracker``, ``_check_scale_growth_tracker`` and the attributes ``_scale``, ``_growth_tracker``,
    ``_per_optimizer_states``, ``_enabled``, ``_device``, ``_init_scale``
        overridden or read by ``scaling/scaler.py`` (the only file that does): the amax is taken in the unscale
        pass and read on the sync ``_maybe_opt_step`` already does; the scale lives on the host. A public
        re-implementation of GradScaler would cost a second sync per step.
    ``torch._amp_foreach_non_finite_check_and_unscale_``
        the fused check-and-unscale kernel GradScaler itself uses; no public equivalent. The bf16/fp32 guard
        runs it with a factor of 1: one multi-tensor kernel instead of a reduction per gradient.
    ``Tensor._values()`` of an uncoalesced sparse gradient
        what GradScaler unscales in place; the public ``values()`` requires a coalesced tensor (a copy).
    ``torch.utils._pytree.tree_leaves``
        flattens module inputs and outputs of any registered container (tuples, dicts, Hugging Face
        ``ModelOutput``); ``torch.utils.pytree`` is public only from torch 2.6 on, we support 2.4.
    ``torch._C._cpu._get_cpu_capability``
        the only way to ask whether a CPU has AVX512-BF16 / AMX-BF16 instructions; falls back to "no".
    ``torch.utils._python_dispatch.TorchDispatchMode``, ``torch.utils.weak.WeakIdKeyDictionary``
        the replay's tracer (``replay.py``) sees every aten operation through a dispatch mode (documented, but
        importable only from the private module) and keys non-finite tensors weakly by identity.
    ``Tensor._version``
        a tensor's version counter, moved by every in-place operation through the dispatcher. The statistics
        reuse a measurement for a container that returns its last submodule's output only if the tensor was
        not written since (an in-place ReLU or ``out += identity`` returns the same tensor, changed). A write
        through ``.data`` does not move it; inference tensors have none (read as written).
    ``OpOverload._schema`` (``arguments[i].alias_info.is_write``, ``is_mutable``)
        which arguments of an aten operation it writes into: how ``side_effects.WriteWatch`` knows, for every
        operation the user's step runs again, whether it is about to overwrite a parameter (``copy_``, ``mul_``,
        ``out=``, ``_foreach_lerp_``, ...). Read during a replay or a re-run only.
    ``torch._C._autograd._get_sequence_nr``, ``torch._C._current_autograd_node``, ``Node._sequence_nr``
        connect a backward operation to the forward operation it differentiates (the node being created /
        run); the only link there is. Read during a replay only, never on a training step.
    ``Tensor._base``
        the tensor a view was taken of: an in-place write through a view makes its base non-finite too, and the
        replay's tracer follows it there. Read during a replay only.
    ``sys._getframe``
        the replay names the user's source line by walking the interpreter's frames from the operation up to
        the frame that started the replay (a traceback of the running code, without raising). Replay only.
    ``Module._modules``
        a module's registered submodules, asked directly: whether a module is ``torch.compile``'s wrapper
        (``_orig_mod`` among them) without ``hasattr``, which raises and catches per module (half the cost of
        arming a statistics sample).

Lightning (live objects changed for the length of a fit or a re-run, each undone)
    ``Strategy.training_step`` on the strategy instance
        every ``training_step`` call is wrapped to keep how to run that micro-batch again (replay, rescue) with
        the batch as the LightningModule receives it; Lightning has no hook that sees the step's arguments and
        can run it again. Set at connect, removed at teardown (``wrap_training_step``).
    ``LightningModule.log`` / ``log_dict`` and ``manual_backward`` on the module instance
        a replay or a re-run of ``training_step`` must not log twice, and a replayed manual-optimization step's
        ``manual_backward`` hands its loss to the replay; instance attributes, removed on the way out
        (``muted_logging``, ``redirected_manual_backward``).
    ``LightningOptimizer._on_before_step`` / ``_on_after_step``
        the manual-optimization loop counts optimizer steps through them; a replayed ``training_step`` must not
        count its ``opt.step()`` calls (they never step), so the replay mutes them for its duration.
    ``lightning.fabric.plugins.precision.amp._optimizer_handles_unscaling``
        whether an optimizer (``fused=True``) unscales inside its own ``step``; it reads torch's private
        ``_step_supports_amp_scaling`` flag. Lightning's own ``MixedPrecision`` uses the same helper.
    ``lightning.fabric.plugins.precision.utils._convert_fp_tensor``
        how Fabric's ``MixedPrecision`` casts floating-point inputs and outputs; the Fabric plugin casts with it
        so that its numerics stay Fabric's bit for bit if Lightning changes the rule.
    ``Precision._after_closure``
        the base-class step that runs ``on_before_optimizer_step`` and gradient clipping; ``MixedPrecision``
        calls it the same way, between unscaling and the optimizer step.
    ``WeightAveraging.should_update`` (a public override point, set per instance)
        ``EMAWeightAveraging`` and its kin update their average in ``on_train_batch_end`` after every optimizer
        step, a skipped one too; the plugin gives each such callback of the Trainer a ``should_update`` that
        says no after a skipped step (``skip_weight_averaging_on_skipped_steps``), removed at teardown.
    ``_call_callback_hooks`` skips a callback hook that is not callable
        Lightning calls every callback's every per-batch hook, the base class's empty ones too, each inside a
        profiler context: about 10 us per callback per step on a warm loop here, more right after a backward.
        ``skip_inherited_batch_hooks`` shadows the empty ones with ``None``, which Lightning's own
        ``callable(fn)`` check then skips; a callback overriding a hook keeps it.
    ``torchao.optim._AdamW``
        torchao's AdamW that rounds bf16 weights stochastically (``bf16_stochastic_round=True``) with state in the
        weights' dtype; ``master_weights="stochastic"`` replaces torch's AdamW with it (``torchao_adamw``).
    ``LRScheduler``'s patch of ``optimizer.step`` (``_wrapped_by_lr_sched``, ``_opt_called``)
        a scheduler pointed at a replacement optimizer gets the same patch (``retarget_scheduler``), or its
        ``step()`` would warn that the optimizer was never stepped.

Removed, because a public way exists: ``trainer._checkpoint_connector._loaded_checkpoint`` (callbacks get their
state in ``Precision.on_load_checkpoint``), ``LightningModule._trainer`` (``module.trainer`` raises
``RuntimeError`` when detached), ``grad.coalesce()._values()`` (``values()`` after ``coalesce()``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "retarget_scheduler",
    "torchao_adamw",
    "GRADSCALER_HOOKS",
    "OptState",
    "TorchDispatchMode",
    "WeakIdKeyDictionary",
    "autograd_sequence_nr",
    "current_autograd_node",
    "muted_step_counting",
    "node_sequence_nr",
    "after_closure",
    "cpu_capability",
    "foreach_non_finite_check_and_unscale_",
    "restore_weight_averaging",
    "skip_inherited_batch_hooks",
    "skip_weight_averaging_on_skipped_steps",
    "tensor_version",
    "optimizer_handles_unscaling",
    "refresh_per_optimizer_state",
    "scaler_device",
    "caller_frame",
    "is_compiled_wrapper",
    "muted_logging",
    "redirected_manual_backward",
    "tensor_base",
    "tree_leaves",
    "unwrap_training_step",
    "wrap_training_step",
    "written_tensors",
]

# GradScaler's private methods AdaptiveLossScaler overrides or calls, and the attributes it reads.
GRADSCALER_HOOKS = (
    "_unscale_grads_",
    "_maybe_opt_step",
    "_lazy_init_scale_growth_tracker",
    "_get_growth_tracker",
    "_check_scale_growth_tracker",
)
GRADSCALER_ATTRIBUTES = ("_scale", "_growth_tracker", "_per_optimizer_states", "_enabled", "_device", "_init_scale")

refresh_per_optimizer_state = _refresh_per_optimizer_state
foreach_non_finite_check_and_unscale_ = torch._amp_foreach_non_finite_check_and_unscale_


def optimizer_handles_unscaling(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` unscales the gradients itself (fused optimizers)."""
    global _optimizer_handles_unscaling
    if _optimizer_handles_unscaling is None:  # Lightning loads on first use; asked every step after that
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
    return _optimizer_handles_unscaling(optimizer)


_optimizer_handles_unscaling: Callable[[Any], bool] | None = None


def torchao_adamw() -> type:
    """torchao's plain AdamW with ``bf16_stochastic_round`` (``torchao.optim._AdamW``: torchao's only AdamW that
    rounds into bf16 stochastically without also quantizing its state; private by name in torchao 0.18)."""
    from torchao.optim import _AdamW

    return _AdamW


def retarget_scheduler(scheduler: Any, optimizer: Any) -> None:
    """Point an LR scheduler at a replacement optimizer, with the step patch torch's ``LRScheduler.__init__`` puts
    on its optimizer (``_wrapped_by_lr_sched`` / ``_opt_called``: without it ``scheduler.step()`` warns that the
    optimizer was never stepped)."""
    import functools
    import weakref

    scheduler.optimizer = optimizer
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler: each of theirs too
        retarget_scheduler(inner, optimizer)
    if not hasattr(scheduler, "base_lrs") or hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func, ref = optimizer.step.__func__, weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def convert_fp_tensor(tensor: torch.Tensor, dst_type: torch.dtype) -> torch.Tensor:
    """A floating-point tensor in ``dst_type`` (others unchanged), as Fabric's ``MixedPrecision`` casts."""
    from lightning.fabric.plugins.precision.utils import _convert_fp_tensor

    return _convert_fp_tensor(tensor, dst_type)


def after_closure(plugin: Any, model: Any, optimizer: Any) -> None:
    """Lightning's ``on_before_optimizer_step`` hook and gradient clipping, as ``MixedPrecision`` runs them."""
    global _Precision
    if _Precision is None:  # imported on first use (Fabric users need not load lightning.pytorch); every step
        from lightning.pytorch.plugins.precision import Precision as _Precision
    _Precision._after_closure(plugin, model, optimizer)  # looked up on the class: a patch of it is honoured


_Precision: Any = None


def scaler_device(scaler: torch.amp.GradScaler) -> str:
    """The device type a GradScaler was built for (GradScaler keeps it only as ``_device``)."""
    return scaler._device


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The version counter of ``tensor`` (see the fence); ``None`` for an inference tensor, which has none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def cpu_capability() -> dict[str, Any]:
    """torch's CPU feature flags (``{"avx512_bf16": True, ...}``); empty where torch cannot tell."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        return {}


def autograd_sequence_nr() -> int:
    """The sequence number the next autograd node will get (inside a dispatch mode: the node being made, + 1)."""
    return torch._C._autograd._get_sequence_nr()


def current_autograd_node() -> Any:
    """The autograd node whose backward is running on this thread, or None."""
    return torch._C._current_autograd_node()


def node_sequence_nr(node: Any) -> int:
    return node._sequence_nr()


def written_tensors(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an aten operation (``func``, an ``OpOverload`` seen by a dispatch mode) writes into."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    written: list[torch.Tensor] = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) and not argument.kwarg_only else kwargs.get(argument.name)
        if isinstance(value, torch.Tensor):
            written.append(value)
        elif isinstance(value, (list, tuple)):
            written.extend(v for v in value if isinstance(v, torch.Tensor))
    return written


# The callback hooks Lightning's loops call once per batch or per optimizer step.
BATCH_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


def skip_inherited_batch_hooks(callback: Any) -> None:
    """Let Lightning skip the per-batch hooks ``callback`` inherits empty from ``Callback`` (see the fence)."""
    from lightning.pytorch import Callback

    for name in BATCH_HOOKS:
        if getattr(type(callback), name) is getattr(Callback, name):
            setattr(callback, name, None)


def skip_weight_averaging_on_skipped_steps(callbacks: list[Any], was_skipped: Callable[[], bool]) -> list[Any]:
    """Make Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``, ...) among ``callbacks`` leave
    their average alone after a skipped optimizer step; returns the callbacks changed (``restore_weight_averaging``
    undoes it).

    ``WeightAveraging.on_train_batch_end`` asks ``self.should_update(step_idx=...)``, the hook its docs tell
    users to override; the instance gets a ``should_update`` that says no for a skipped step and otherwise
    asks the callback's own. Lightning 2.6 added these callbacks; older versions have none to change.
    """
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:
        return []
    changed = []
    for callback in callbacks:
        if isinstance(callback, WeightAveraging) and "should_update" not in callback.__dict__:
            own = callback.should_update

            def should_update(step_idx: int | None = None, epoch_idx: int | None = None, own: Any = own) -> bool:
                if step_idx is not None and was_skipped():
                    return False
                return own(step_idx=step_idx, epoch_idx=epoch_idx)

            callback.should_update = should_update
            changed.append(callback)
    return changed


def restore_weight_averaging(callbacks: list[Any]) -> None:
    for callback in callbacks:
        callback.__dict__.pop("should_update", None)


LIGHTNING_OPTIMIZER_COUNTERS = ("_on_before_step", "_on_after_step")


def muted_step_counting(lightning_optimizers: list[Any]) -> Callable[[], None]:
    """Make ``LightningOptimizer.step`` count nothing; returns the function that undoes it."""
    saved = [
        (opt, {name: opt.__dict__.get(name) for name in LIGHTNING_OPTIMIZER_COUNTERS}) for opt in lightning_optimizers
    ]
    for opt, _ in saved:
        for name in LIGHTNING_OPTIMIZER_COUNTERS:
            setattr(opt, name, _nothing)

    def undo() -> None:
        for opt, values in saved:
            for name, value in values.items():
                if value is None:
                    opt.__dict__.pop(name, None)
                else:
                    setattr(opt, name, value)

    return undo


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def tensor_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``tensor`` is a view of, or ``None``."""
    return tensor._base


def caller_frame(depth: int = 1) -> Any:
    """The frame ``depth`` levels above the caller's (``sys._getframe(depth + 1)``)."""
    return sys._getframe(depth + 1)


def is_compiled_wrapper(module: torch.nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (it keeps the original as submodule ``_orig_mod``)."""
    return "_orig_mod" in module._modules


def wrap_training_step(strategy: Any, before: Callable[..., None]) -> None:
    """Call ``before(*args, **kwargs)`` ahead of every ``strategy.training_step`` call (see the fence)."""
    unwrap_training_step(strategy)  # a wrapper from an earlier fit
    original = strategy.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(*args, **kwargs)

    strategy.training_step = training_step


def unwrap_training_step(strategy: Any) -> None:
    strategy.__dict__.pop("training_step", None)


@contextlib.contextmanager
def muted_logging(module: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (a step run again must not count its metrics twice)."""
    module.log = module.log_dict = _nothing
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)


@contextlib.contextmanager
def redirected_manual_backward(module: Any, backward: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """``self.manual_backward(loss)`` hands the loss to ``backward`` inside (a replayed manual step)."""
    module.manual_backward = lambda loss, *args, **kwargs: backward(loss)
    try:
        yield
    finally:
        module.__dict__.pop("manual_backward", None)
