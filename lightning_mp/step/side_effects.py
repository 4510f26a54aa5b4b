"""Side effects of the user's step: what running ``training_step`` again must not leave behind.

A replay (``replay.py``) and a rescue re-run (``core.py``) execute the user's ``training_step`` a second time.
That code does more than compute a loss, and each of its habits leaves a trace when it runs twice:

* a GAN toggles optimizers (``self.toggle_optimizer(opt)`` sets ``requires_grad`` and keeps the old flags in
  ``self._param_requires_grad_state``); a replay stops at ``opt.step()``, before the untoggle, and the real
  step's untoggle would then restore the replay's toggled flags;
* BYOL / MoCo / DINO update an EMA teacher in place (``t.mul_(m).add_(s, alpha=1 - m)``, or through
  ``.data``), which a second run applies twice;
* Lightning's own examples keep tensors and lists on the module (``self.generated_imgs = ...``,
  ``self.training_step_outputs.append(loss)``), count things (``self.n += 1``), switch submodules to ``eval()``,
  and register hooks for the length of a step.

Two tools put that state back:

:class:`ModuleState` captures, for every module, its attribute bindings (``__dict__``: counters, kept tensors,
the ``training`` flag, Lightning's toggling state), the contents of its top-level containers (dicts, lists and
sets: hooks, registered parameters and submodules, a list of step outputs) and the ``requires_grad`` flag of
every parameter and buffer; ``restore()`` makes them as they were. Objects *inside* those containers that are
mutated in place (an item of a list of lists) are not followed; tensors are, by the next tool.

:class:`WriteWatch` is a dispatch mode that sees every operation of the re-run and, before the first write
into the storage of a watched tensor (parameters; ``.data`` writes included, they share the storage), keeps a
copy of it: copy-on-write, so memory is spent only on what the user's code really writes. ``restore()``
writes the copies back and undoes a ``p.data = new`` rebinding. What it saw written is also the evidence the
rescue needs: a tensor that ``training_step`` writes in place must be copied *before* the first attempt of a
step (see :class:`InPlaceParams`), since its value from before the step is gone once the attempt ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp._compat import TorchDispatchMode, written_tensors

__all__ = ["InPlaceParams", "ModuleState", "RerunState", "WriteWatch"]

_CONTAINERS = (dict, list, set)
_MISSING = object()


def _storage_key(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, meta or a tensor subclass without one storage
        return None


class ModuleState:
    """The attribute bindings, top-level container contents and ``requires_grad`` flags of some modules.

    Args:
        modules: the modules to capture (``model.modules()`` for all of them).
        public: capture only attributes whose name does not start with ``_``, and a list by its length
            (restored by dropping what was appended): the cheap form a rescue takes on every step for the
            LightningModule itself, which leaves Lightning's own (private) bookkeeping alone and costs the
            same however long ``self.training_step_outputs`` grows.
    """

    def __init__(self, modules: Iterable[nn.Module], public: bool = False) -> None:
        self._public = public
        self._captured: list[tuple[nn.Module, dict[str, Any], list[tuple[Any, Any]]]] = []
        flags: dict[int, tuple[Tensor, bool]] = {}
        for module in modules:
            bindings = module.__dict__.copy()  # private names are left alone at restore in the public form
            if public:  # every step of a rescuing run: the cheapest capture that still restores appends
                contents = [(v, len(v)) for k, v in bindings.items() if type(v) is list and k[0] != "_"]
                self._captured.append((module, bindings, contents))
                continue
            contents = []
            for value in bindings.values():
                if isinstance(value, dict):  # OrderedDicts of hooks, registered parameters and submodules too
                    contents.append((value, list(value.items())))
                elif type(value) in _CONTAINERS:
                    contents.append((value, list(value)))
            self._captured.append((module, bindings, contents))
            if not public:
                for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    flags[id(tensor)] = (tensor, tensor.requires_grad)
        self._flags = list(flags.values())

    def restore(self) -> None:
        """Put every captured binding, container content and flag back (only what changed is written)."""
        for module, bindings, contents in self._captured:
            current = module.__dict__
            added = [k for k in current if k not in bindings and not (self._public and k.startswith("_"))]
            for name in added:
                del current[name]
            for name, value in bindings.items():
                if current.get(name, _MISSING) is not value and not (self._public and name.startswith("_")):
                    current[name] = value  # the raw binding, as it was: no Module.__setattr__ side effects
            for container, items in contents:
                _refill(container, items)
        for tensor, flag in self._flags:
            if tensor.requires_grad != flag:
                tensor.requires_grad_(flag)


def _refill(container: Any, items: Any) -> None:
    if isinstance(items, int):  # a list captured by its length: drop what was appended since
        del container[items:]
        return
    if isinstance(container, dict):
        now = list(container.items())
        same = len(now) == len(items) and all(a[0] is b[0] and a[1] is b[1] for a, b in zip(now, items))
        if not same:
            container.clear()
            container.update(items)
        return
    now = list(container)
    if len(now) != len(items) or any(a is not b for a, b in zip(now, items)):
        if isinstance(container, list):
            container[:] = items
        else:
            container.clear()
            container.update(items)


class WriteWatch(TorchDispatchMode):
    """Copy-on-write over ``tensors`` while code runs under this mode (see the module docstring).

    Args:
        tensors: name -> tensor to watch (a model's ``named_parameters()``).
    """

    def __init__(self, tensors: Iterable[tuple[str, Tensor]]) -> None:
        super().__init__()
        self._tensors = dict(tensors)
        self._by_storage: dict[int, list[str]] = {}
        self._aliases: dict[str, Tensor] = {}  # what each tensor's data was: undoes a `p.data = new`
        for name, tensor in self._tensors.items():
            key = _storage_key(tensor)
            if key is not None:
                self._by_storage.setdefault(key, []).append(name)
                self._aliases[name] = tensor.detach()
        self.saved: dict[str, Tensor] = {}  # name -> its value before the first write

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for tensor in written_tensors(func, args, kwargs):
            for name in self._by_storage.get(_storage_key(tensor), ()):
                if name not in self.saved:
                    self.saved[name] = self._tensors[name].detach().clone()  # the mode is off in here
        return func(*args, **kwargs)

    @property
    def rebound(self) -> list[str]:
        """Watched tensors whose data was replaced (``p.data = new``) while the mode was on."""
        return [
            name for name, alias in self._aliases.items() if _storage_key(self._tensors[name]) != _storage_key(alias)
        ]

    @property
    def written(self) -> list[str]:
        """Everything the watched code changed: written in place or rebound."""
        return sorted({*self.saved, *self.rebound})

    def restore(self, names: Iterable[str] | None = None) -> None:
        """Undo the writes (all of them, or those to ``names``): rebind replaced data, then copy values back."""
        wanted = set(self.written if names is None else names)
        with torch.no_grad():
            for name in self.rebound:
                if name in wanted:
                    self._tensors[name].data = self._aliases[name]
            for name, value in self.saved.items():
                if name in wanted:
                    self._tensors[name].copy_(value)


class InPlaceParams:
    """Parameters the user's ``training_step`` writes in place, copied at the start of every step so that a
    rescue can run the step again from where it began (an EMA teacher updated twice would drift).

    Which ones is learned from what a :class:`WriteWatch` saw (the first step runs under one when rescues are
    on; every replay and re-run does). Memory: one copy of what the step writes anyway.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._saved: dict[str, Tensor] = {}

    def learn(self, names: Iterable[str]) -> list[str]:
        """Add names; returns those that were new."""
        new = sorted(set(names) - self.names)
        self.names.update(new)
        return new

    def take(self, model: nn.Module) -> None:
        """Copy the learned parameters now (the start of a step); into the same memory after the first time."""
        if not self.names:
            return
        params = dict(model.named_parameters())
        for name in self.names:
            param = params.get(name)
            if param is None:
                continue
            saved = self._saved.get(name)
            if saved is None or saved.shape != param.shape or saved.dtype != param.dtype:
                self._saved[name] = param.detach().clone()
            else:
                saved.copy_(param.detach())

    def restore(self, model: nn.Module) -> None:
        """Put the copies back (before a re-run of the step)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, saved in self._saved.items():
                if name in params:
                    params[name].copy_(saved)

    def clear(self) -> None:
        self.names.clear()
        self._saved.clear()


class RerunState:
    """What a rescue re-run of a step starts from, beyond the buffers and the RNG (kept elsewhere): the
    parameters ``training_step`` writes in place, as they were when the step began, and the LightningModule's
    public attribute bindings (a counter, a kept tensor, a list of step outputs).

    Per step (only while rescues are on): a copy of the learned parameters and of the module's public
    ``__dict__`` (under a microsecond for a plain LightningModule). The first step runs under a
    :class:`WriteWatch` to learn what the step writes; replays and re-runs teach it too.
    """

    def __init__(self) -> None:
        self.in_place = InPlaceParams()
        self.watch_next = True  # the next first attempt of a step runs under a WriteWatch (learning)
        self._bindings: ModuleState | None = None
        self._uncopied: set[str] = set()  # learned during this step: no copy from its start exists

    def first_run(self, model: nn.Module | None, closure: Callable[[], Any]) -> Any:
        """Run the first step's closure under a write watch (once per fit): what ``training_step`` writes in
        place (an EMA teacher) is then copied at the start of every later step."""
        self.watch_next = False
        watch = WriteWatch(model.named_parameters() if model is not None else ())
        with watch:
            result = closure()
        self.learn(watch.written)
        return result

    def take(self, model: nn.Module) -> None:
        """The step begins: copy what a re-run must start from."""
        self.in_place.take(model)
        self._bindings = ModuleState([model], public=True)
        self._uncopied = set()

    def before_rerun(self, model: nn.Module) -> None:
        self.in_place.restore(model)
        if self._bindings is not None:
            self._bindings.restore()

    def learn(self, written: Iterable[str]) -> list[str]:
        """Learn from a run of the step (its first attempt, or a replay): returns the newly learned names."""
        return self.in_place.learn(written)

    def after_rerun(self, watch: WriteWatch) -> list[str]:
        """After a re-run: what it wrote that was not copied when the step began is put back as the first
        attempt left it (written once, not twice), and learned. Returns those names (empty: exact)."""
        new = self.in_place.learn(watch.written)
        self._uncopied.update(new)
        watch.restore([name for name in watch.written if name in self._uncopied])  # every re-run of this step
        return new

    def clear(self) -> None:
        self.in_place.clear()
        self.watch_next = True
        self._bindings = None
