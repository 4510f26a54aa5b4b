"""``HookSet``: a hook for every named submodule of a model, registered and removed together.

Attribution (execution order, the forward probe) and the statistics all hook every submodule for a while and
must leave nothing behind; this is the one place that keeps the handles.

Compiled code does not run hooks added after it was compiled (dynamo does not guard on module hooks:
its ``skip_nnmodule_hook_guards`` setting), and guarding on them would recompile at every sample.
So a step whose hooks are armed runs its forward eagerly (:func:`eager`): compiled models get the same
statistics and attribution, and the number of compiled graphs stays that of a run without us.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_mp._compat import is_compiled_wrapper

__all__ = ["HookSet", "eager"]

HookKind = Literal["forward_pre", "forward", "forward_with_kwargs"]


# A dispatching HookSet walks the model again at the latest on every this-many registrations (a submodule put
# straight into ``_modules``, which no registration hook sees).
REWALK_EVERY = 8

# Bumped whenever any module in the process registers a submodule (``self.x = module``, ``add_module``, a
# ``torch.compile`` wrapper assigned in place): a dispatching HookSet's table stays valid while it is unchanged.
_registrations = 0
_watching: Any = None


def _module_registered(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global _registrations
    if torch.compiler.is_compiling():
        # Code being compiled that builds a module (Llama's ``self.layers[: n]`` makes a ModuleList on every
        # call): counting here would be traced as a condition and recompile the graph on every call. A module
        # built inside compiled code is transient; arming reads the model's own submodules, not those.
        return
    _registrations += 1


def _watch_registrations() -> int:
    """Start counting submodule registrations (one global registration hook for the process, never removed:
    it only counts); returns the count."""
    global _watching
    if _watching is None:
        _watching = torch.nn.modules.module.register_module_module_registration_hook(_module_registered)
    return _registrations


@dataclass
class _Table:
    """A dispatching HookSet's submodules and their hooks, kept for the next arming while still valid."""

    model: weakref.ref  # the root module, held weakly
    make_hook: Callable[..., Any]
    kind: str
    registrations: int  # the process's submodule registrations when the model was walked
    hooks: dict[int, tuple[weakref.ref, Any]]  # id -> (weak reference to the module, its hook)
    uses_left: int  # armings before the model is walked again anyway

    def fits(self, model: nn.Module, make_hook: Callable[..., Any], kind: str, registrations: int) -> bool:
        return (
            self.model() is model
            and self.make_hook is make_hook
            and self.kind == kind
            and self.registrations == registrations
            and self.uses_left > 0
        )


class HookSet:
    """Hooks that live for a while on every named submodule (the root itself is never hooked).

    Args:
        dispatch: register one global module hook that dispatches to each submodule's hook instead of one hook
            per submodule. Arming and disarming then cost one registration, for hooks armed and disarmed on
            every sampled step (the statistics). Such a hook runs before a module's own hooks and, while armed,
            is consulted by every module call in the process: arm it for one step at a time only. The table of
            submodules and their hooks is kept for the next registration with the same model and ``make_hook``
            (the walk through the model was most of the cost of arming) until a module anywhere registers a
            submodule, and at most ``REWALK_EVERY`` registrations.
    """

    def __init__(self, dispatch: bool = False) -> None:
        self._handles: list[Any] = []
        self.dispatch = dispatch
        self._finalizer: weakref.finalize | None = None  # removes a global hook whose model is gone
        self._table: _Table | None = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def register(self, model: nn.Module, make_hook: Callable[[str], Callable[..., Any]], kind: HookKind) -> None:
        """Hook every submodule with ``make_hook(fqn)``, replacing any hooks this set still holds.

        Args:
            model: the root module; fqns are relative to it.
            make_hook: builds the hook for one module from its fully qualified name.
            kind: ``"forward_pre"`` (``hook(module, args)``), ``"forward"`` (``hook(module, args, output)``)
                or ``"forward_with_kwargs"`` (``hook(module, args, kwargs, output)``; always one per submodule:
                global hooks take keyword arguments only on newer torch).
        """
        self.remove()
        registrations = _watch_registrations() if self.dispatch else 0
        table = self._table
        if table is not None and table.fits(model, make_hook, kind, registrations):
            table.uses_left -= 1
            self._register_dispatch(model, table.hooks, kind)
            return
        self._table = None
        modules = [(fqn, module) for fqn, module in model.named_modules() if fqn]
        # A global hook makes torch warn on every call of a torch.compile'd submodule (an OptimizedModule, which
        # keeps the original as its submodule ``_orig_mod``): such models get one hook per submodule. Asked of
        # ``_modules`` directly: ``hasattr`` on a module raises and catches an AttributeError for every module,
        # half the cost of arming a sample.
        compiled = any(is_compiled_wrapper(module) for _, module in modules)
        if not self.dispatch or compiled or kind == "forward_with_kwargs":
            for fqn, module in modules:
                if kind == "forward_pre":
                    handle = module.register_forward_pre_hook(make_hook(fqn))
                else:
                    handle = module.register_forward_hook(make_hook(fqn), with_kwargs=kind == "forward_with_kwargs")
                self._handles.append(handle)
            return
        # id -> (weak reference to the module, its hook): the reference tells ours from an unrelated module that
        # reused a freed id, without keeping the model alive through the global hook table.
        hooks = {id(module): (weakref.ref(module), make_hook(fqn)) for fqn, module in modules}
        self._table = _Table(weakref.ref(model), make_hook, kind, registrations, hooks, REWALK_EVERY - 1)
        self._register_dispatch(model, hooks, kind)

    def _register_dispatch(self, model: nn.Module, hooks: dict[int, tuple[weakref.ref, Any]], kind: HookKind) -> None:
        def dispatch(module: nn.Module, *args: Any) -> Any:
            entry = hooks.get(id(module))
            return entry[1](module, *args) if entry is not None and entry[0]() is module else None

        if kind == "forward_pre":
            handle = torch.nn.modules.module.register_module_forward_pre_hook(dispatch)
        else:
            handle = torch.nn.modules.module.register_module_forward_hook(dispatch)
        self._handles.append(handle)
        # Nothing else may keep it registered once the model is gone (a loop that raised before removing it).
        self._finalizer = weakref.finalize(model, handle.remove)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run ``torch.compile``d code eagerly inside this context (torch >= 2.6; a no-op before)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
