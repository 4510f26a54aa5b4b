"""fp32 islands: modules (or a module's own code) that run in fp32 inside autocast, and ``fp32`` regions.

An *fp32 island* is a module whose forward runs with autocast disabled and its floating inputs cast to fp32.
Its parameters are fp32 already (autocast keeps master weights in fp32), so everything recorded for autograd
inside it is fp32: the backward runs in fp32 too, and its outputs are fp32. The rest of the model keeps its
low-precision kernels.

An island has a *scope*. A ``"module"`` island runs the whole module in fp32, its submodules included: right
for a leaf (a ``LayerNorm``, a ``Linear`` head) whose kernel overflows. An ``"own_code"`` island runs only the
module's *own* operations in fp32, the arithmetic written in its ``forward`` between submodule calls, and gives
its submodules the run's low precision back (autocast on again around each direct child call, the child's
floating outputs cast to fp32 for the module's own code). That is what an overflow born in a container's own
code calls for: a block whose ``forward`` multiplies by a large constant, or a whole network kept as
``self.model`` whose ``forward`` scales its logits (nanoGPT). Promoting by evidence, not by size: the replay
names the module running the operation that overflowed, and a container named there overflowed in its own code.

Why islands are applied in place: Lightning's DDP strategy discards the return value of
``Precision.convert_module``, so the plugin changes the model it is given (``module.forward`` becomes an
instance attribute) and ``remove_fp32`` undoes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from lightning_mp.fallback.filters import ModuleFilter
from lightning_mp.formats.base import cast_own_tensors, default_dtype

__all__ = ["SCOPES", "Scope", "apply_fp32", "fp32", "is_fp32_island", "island_scope", "remove_fp32"]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (not fp64), in nested lists, tuples and dicts, cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        converted = [_cast(v, dtype) for v in value]
        return type(value)(converted) if not hasattr(value, "_fields") else type(value)(*converted)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _to_fp32(value: Any) -> Any:
    return _cast(value, torch.float32)


class _Fp32Forward:
    """Replacement ``forward``: autocast off, floating inputs cast to fp32, then the original forward.

    With low-precision weights (``low_dtype``: ``"bf16-true"``, ``"16-true"``) the island's weights are fp32 (see
    ``apply_fp32``) and its floating outputs are cast back to ``low_dtype`` for the rest of the model.
    """

    def __init__(self, original: Callable[..., Any], device_type: str, low_dtype: torch.dtype | None = None) -> None:
        self.original = original
        self.device_type = device_type
        self.low_dtype = low_dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.low_dtype is None:
            with torch.autocast(self.device_type, enabled=False):
                return self.original(*_to_fp32(args), **_to_fp32(kwargs))
        with torch.autocast(self.device_type, enabled=False), default_dtype(torch.float32):  # tensors made inside
            output = self.original(*_to_fp32(args), **_to_fp32(kwargs))
        return _cast(output, self.low_dtype)


_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "hpu")


class fp32:  # noqa: N801 - lower case like torch.no_grad: it reads as a statement in a forward
    """Run a region of your own ``forward`` in fp32 inside autocast, finer than a whole module.

    For arithmetic written in a ``forward`` itself (no submodule to name in ``fp32_modules``): a logit scale,
    a hand-written softmax or log-sum-exp, an attention score. Two forms:

    * ``with lightning_mp.fp32(): ...`` turns autocast off inside the block, on every device type where it is
      on, so operations on fp32 tensors stay fp32. Tensors that are already fp16/bf16 stay so: cast the values
      that enter the block (``x.float()``).
    * ``@lightning_mp.fp32`` (or ``@lightning_mp.fp32()``, as ``torch.no_grad`` takes both) on a function does
      the same and also casts its floating tensor arguments to fp32 (nested lists, tuples and dicts included), as
      an fp32 island does for a module's inputs.

    Outside autocast both are no-ops. The backward of the region runs in fp32 as well (autograd records the
    fp32 operations).
    """

    def __new__(cls, function: Callable[..., Any] | None = None) -> Any:
        if function is not None:  # ``@fp32`` without parentheses: decorate right away
            if not callable(function):
                raise TypeError(f"lightning_mp.fp32({function!r}) is invalid: use it bare, or on a function.")
            return super().__new__(cls)(function)
        return super().__new__(cls)

    def __enter__(self) -> fp32:
        self._contexts = []
        for device_type in _AUTOCAST_DEVICE_TYPES:
            with contextlib.suppress(RuntimeError, ValueError):  # a device type this torch build does not know
                if torch.is_autocast_enabled(device_type):
                    context = torch.autocast(device_type, enabled=False)
                    context.__enter__()
                    self._contexts.append(context)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc_info)
        self._contexts = []

    def __call__(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def in_fp32(*args: Any, **kwargs: Any) -> Any:
            with fp32():
                return function(*_to_fp32(args), **_to_fp32(kwargs))

        return in_fp32


class _OwnCodeForward(_Fp32Forward):
    """Replacement ``forward`` of an own-code island: the module's own operations in fp32, the submodules it
    calls under the autocast that was on when the module was called.

    The submodules its body calls are its direct children, and the children of a ``ModuleList`` /
    ``ModuleDict`` child (containers that are never called themselves: nanoGPT's ``self.transformer.h[i]``).
    A forward pre-hook on each turns that autocast back on for a call made from the module's own body (not from
    inside another of them), and a forward hook (``always_call``: an exception unwinds it too) turns it off
    again and casts the submodule's floating outputs to fp32, so that the module's own arithmetic on them runs
    in fp32 and a matmul never meets an fp16 and an fp32 operand.
    """

    def __init__(
        self, original: Callable[..., Any], device_type: str, module: nn.Module, low_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(original, device_type, low_dtype)
        self._frames: list[list[Any]] = []  # per active call of the module: [caller's autocast dtype, depth]
        self._calls: list[contextlib.AbstractContextManager | None] = []  # per active hooked call
        self.handles = []
        for child in _called_submodules(module):
            self.handles.append(child.register_forward_pre_hook(self._child_starts, with_kwargs=True))
            self.handles.append(child.register_forward_hook(self._child_ends, always_call=True))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        on = torch.is_autocast_enabled(self.device_type)
        self._frames.append([torch.get_autocast_dtype(self.device_type) if on else None, 0])
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._frames.pop()

    def _child_starts(self, child: nn.Module, args: Any, kwargs: Any) -> Any:
        frame = self._frames[-1] if self._frames else None
        context: Any = None
        cast_args = None
        if frame is not None:
            if frame[1] == 0 and self.low_dtype is not None:  # from the own body, low-precision weights: cast
                context = default_dtype(self.low_dtype)  # the child's own tensors too, as outside the island
                context.__enter__()
                cast_args = (_cast(args, self.low_dtype), _cast(kwargs, self.low_dtype))
            elif frame[0] is not None and frame[1] == 0:  # called from the module's own body, under autocast
                context = torch.autocast(self.device_type, dtype=frame[0], cache_enabled=False)
                context.__enter__()
            frame[1] += 1
        self._calls.append(context)
        return cast_args

    def _child_ends(self, child: nn.Module, args: Any, output: Any) -> Any:
        context = self._calls.pop() if self._calls else None
        if self._frames:
            self._frames[-1][1] -= 1
        if context is None:
            return None  # not re-enabled here: leave the output alone
        context.__exit__(None, None, None)
        return _to_fp32(output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _called_submodules(module: nn.Module) -> list[nn.Module]:
    """The submodules a module's ``forward`` can call directly: its children, looking through containers that
    have no ``forward`` of their own (``ModuleList``, ``ModuleDict``)."""
    found = []
    for child in module.children():
        if type(child).forward is nn.Module.forward:  # a container that is never called itself
            found.extend(_called_submodules(child))
        else:
            found.append(child)
    return found


Scope = Literal["module", "own_code"]
SCOPES: tuple[str, ...] = ("module", "own_code")


def is_fp32_island(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _Fp32Forward)


def island_scope(module: nn.Module) -> Scope | None:
    """``"module"``, ``"own_code"``, or ``None`` for a module that is not an island."""
    forward = module.__dict__.get("forward")
    if not isinstance(forward, _Fp32Forward):
        return None
    return "own_code" if isinstance(forward, _OwnCodeForward) else "module"


def apply_fp32(
    model: nn.Module,
    selected: ModuleFilter | Iterable[str],
    device_type: str,
    scope: Scope = "module",
    low_dtype: torch.dtype | None = None,
) -> list[str]:
    """Turn the selected submodules of ``model`` into fp32 islands, in place.

    Args:
        model: the root module; fqns are relative to it. The root itself is never selected.
        selected: a filter, or an iterable of exact fqns.
        device_type: the autocast device type to disable inside the islands.
        scope: ``"module"`` (the whole module in fp32) or ``"own_code"`` (its own operations only; its
            submodules keep the low precision).
        low_dtype: the weights' dtype in a low-precision-weights format (``"bf16-true"``): the island's own
            parameters and buffers become fp32 (the same ``Parameter`` objects; ``weights.reconcile`` then upcasts
            their optimizer state explicitly), the submodules an own-code island calls get their inputs in
            ``low_dtype``, and the island's outputs are cast back to it. ``None`` under autocast.

    Returns:
        The fqns that became islands by this call, in module order.
    """
    if not callable(selected):
        wanted = set(selected)
        selected = lambda module, fqn: fqn in wanted  # noqa: E731
    converted = []
    for fqn, module in model.named_modules():
        if fqn and not is_fp32_island(module) and selected(module, fqn):
            if scope == "own_code":
                module.forward = _OwnCodeForward(module.forward, device_type, module, low_dtype)
            else:
                module.forward = _Fp32Forward(module.forward, device_type, low_dtype)
            if low_dtype is not None:  # fp32 weights: all of a module island's, an own-code island's own only
                for each in module.modules() if scope == "module" else [module]:
                    cast_own_tensors(each, torch.float32)
            converted.append(fqn)
    return converted


def remove_fp32(model: nn.Module, fqns: Iterable[str] | None = None) -> list[str]:
    """Undo ``apply_fp32`` for ``fqns`` (all islands when ``None``); returns what was removed."""
    wanted = None if fqns is None else set(fqns)
    removed = []
    for fqn, module in model.named_modules():
        if is_fp32_island(module) and (wanted is None or fqn in wanted):
            forward = module.__dict__.pop("forward")
            if isinstance(forward, _OwnCodeForward):
                forward.remove()
            removed.append(fqn)
    return removed
