"""Layer-wise FP32 fallback: choose modules, run them as fp32 islands inside autocast, promote at run time.

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

Which modules? A *filter* ``(module, fqn) -> bool`` decides, in the torchao float8 shape. ``fp32_filter``
builds one from what users naturally write: module classes, fqn glob patterns, or a filter. ``by_type`` and
``by_name`` are the two helpers underneath.

Why islands are applied in place: Lightning's DDP strategy discards the return value of
``Precision.convert_module``, so the plugin changes the model it is given (``module.forward`` becomes an
instance attribute) and ``remove_fp32`` undoes it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_mp.errors import ConfigError

__all__ = [
    "DEFAULT_FP32_MODULES",
    "ModuleFilter",
    "Promotion",
    "PromotionRule",
    "apply_fp32",
    "by_name",
    "by_type",
    "fp32",
    "fp32_filter",
    "is_fp32_island",
    "island_scope",
    "remove_fp32",
]

ModuleFilter = Callable[[nn.Module, str], bool]

# What runs in fp32 by default, per precision, and the measured reason (``python -m benchmarks.fp16_norms``).
# A norm's variance does not overflow fp16: the CPU and CUDA kernels take statistics in fp32 (Welford), and
# every norm stayed finite forward and backward up to |x| = 6e4. What goes wrong is two CPU fp16 kernels that
# keep a running sum in fp16: LayerNorm's backward accumulates dgamma/dbeta in an fp16 buffer (0.6-0.8% off
# at any scale, inf once a loss-scaled partial sum passes 65504), and LogSoftmax keeps each row's sum of
# exponentials in fp16 (every log-probability -inf once ~65504 near-equal logits share a row: a 128k-token
# head at initialization; 5e-3 to 1e-2 nats off otherwise). GroupNorm, InstanceNorm, BatchNorm, RMSNorm and
# Softmax accumulate in fp32 on CPU and match fp32 up to the rounding of their fp16 output: not forced. CUDA
# autocast already runs layer_norm and log_softmax in fp32 (there the islands change nothing). bf16 has fp32's
# exponent range: nothing forced. Each island costs two casts and fp32 math for that module only; models
# without these modules are untouched (bitwise equal to Lightning's MixedPrecision).
DEFAULT_FP32_MODULES: dict[str, tuple[type[nn.Module], ...]] = {
    "16-mixed": (nn.LayerNorm, nn.LogSoftmax),
    "bf16-mixed": (),
    "32-true": (),
}


def by_type(*types: type[nn.Module]) -> ModuleFilter:
    """A filter selecting modules that are instances of any of ``types``."""
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ValueError(f"by_type({t!r}) is invalid: expected nn.Module subclasses.")
    return lambda module, fqn: isinstance(module, types)


def by_name(*patterns: str) -> ModuleFilter:
    """A filter selecting modules whose fully qualified name matches any glob pattern (``encoder.*.attn``)."""
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"by_name({p!r}) is invalid: expected non-empty fqn glob patterns.")
    return lambda module, fqn: any(_name_matches(fqn, p) for p in patterns)


def _name_matches(fqn: str, pattern: str) -> bool:
    """``pattern`` matches the fqn, or the fqn as written without ``torch.compile``'s ``_orig_mod`` level
    (``net.0`` selects ``net._orig_mod.0`` of ``self.net = torch.compile(...)``)."""
    if fnmatch.fnmatchcase(fqn, pattern):
        return True
    plain = ".".join(part for part in fqn.split(".") if part != "_orig_mod")
    return plain != fqn and fnmatch.fnmatchcase(plain, pattern)


def _entries(spec: Any) -> list[Any]:
    """A single entry or any collection of entries (lists, tuples, sets, Hydra's ListConfig) as a list."""
    if isinstance(spec, (str, type)) or callable(spec) or not isinstance(spec, Iterable):
        return [spec]
    return list(spec)


def fp32_filter(spec: Any) -> ModuleFilter:
    """Build one filter from what a user wrote: a class, a glob pattern, a filter, or a sequence of those.

    Raises:
        ValueError: an entry is none of the accepted kinds (names the entry and what is allowed).
    """
    items = _entries(spec)
    filters: list[ModuleFilter] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            filters.append(by_type(item))
        elif isinstance(item, str):
            filters.append(by_name(item))
        elif callable(item):
            filters.append(item)
        else:
            raise ValueError(
                f"fp32_modules entry {item!r} is invalid: expected an nn.Module class, an fqn glob pattern"
                " string, or a (module, fqn) -> bool filter."
            )
    return lambda module, fqn: any(f(module, fqn) for f in filters)


def pattern_misses(spec: Any, model: nn.Module) -> list[str]:
    """Glob patterns in ``spec`` that match no module of ``model`` (usually a typo)."""
    items = _entries(spec)
    names = [fqn for fqn, _ in model.named_modules() if fqn]
    return [p for p in items if isinstance(p, str) and not any(_name_matches(n, p) for n in names)]


def prefixed_suggestions(pattern: str, model: nn.Module) -> list[str]:
    """``child.<pattern>`` for each direct child of ``model`` under which ``pattern`` matches a module: what a
    pattern written against the user's own network (``transformer.h.*.attn``) means inside the LightningModule
    that holds it (``model.transformer.h.*.attn``)."""
    names = [fqn for fqn, _ in model.named_modules() if fqn]
    children = [name for name, _ in model.named_children()]
    return [f"{c}.{pattern}" for c in children if any(_name_matches(n, f"{c}.{pattern}") for n in names)]


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        converted = [_to_fp32(v) for v in value]
        return type(value)(converted) if not hasattr(value, "_fields") else type(value)(*converted)
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


class _Fp32Forward:
    """Replacement ``forward``: autocast off, floating inputs cast to fp32, then the original forward."""

    def __init__(self, original: Callable[..., Any], device_type: str) -> None:
        self.original = original
        self.device_type = device_type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, enabled=False):
            return self.original(*_to_fp32(args), **_to_fp32(kwargs))


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

    def __init__(self, original: Callable[..., Any], device_type: str, module: nn.Module) -> None:
        super().__init__(original, device_type)
        self._frames: list[list[Any]] = []  # per active call of the module: [caller's autocast dtype, depth]
        self._calls: list[contextlib.AbstractContextManager | None] = []  # per active hooked call
        self.handles = []
        for child in _called_submodules(module):
            self.handles.append(child.register_forward_pre_hook(self._child_starts))
            self.handles.append(child.register_forward_hook(self._child_ends, always_call=True))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        on = torch.is_autocast_enabled(self.device_type)
        self._frames.append([torch.get_autocast_dtype(self.device_type) if on else None, 0])
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._frames.pop()

    def _child_starts(self, child: nn.Module, args: Any) -> None:
        frame = self._frames[-1] if self._frames else None
        context = None
        if frame is not None:
            if frame[0] is not None and frame[1] == 0:  # called from the module's own body, under autocast
                context = torch.autocast(self.device_type, dtype=frame[0], cache_enabled=False)
                context.__enter__()
            frame[1] += 1
        self._calls.append(context)

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
    model: nn.Module, selected: ModuleFilter | Iterable[str], device_type: str, scope: Scope = "module"
) -> list[str]:
    """Turn the selected submodules of ``model`` into fp32 islands, in place.

    Args:
        model: the root module; fqns are relative to it. The root itself is never selected.
        selected: a filter, or an iterable of exact fqns.
        device_type: the autocast device type to disable inside the islands.
        scope: ``"module"`` (the whole module in fp32) or ``"own_code"`` (its own operations only; its
            submodules keep the low precision).

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
                module.forward = _OwnCodeForward(module.forward, device_type, module)
            else:
                module.forward = _Fp32Forward(module.forward, device_type)
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


@dataclass(frozen=True)
class Promotion:
    """One module running in fp32 and why."""

    module: str
    reason: str  # "static", "default", "overflow", "kernel error", "escalation"
    step: int | None = None
    detail: str = ""
    scope: Scope = "module"  # "module": the whole module in fp32; "own_code": its own operations only


class PromotionRule:
    """Decides when blame turns into promotion: ``promote_after`` blames within ``window`` optimizer steps.

    Pure bookkeeping over fqns and step numbers, so every rank that feeds it the same combined evidence
    reaches the same decision.
    """

    def __init__(self, promote_after: int = 2, window: int = 100) -> None:
        if not isinstance(promote_after, int) or isinstance(promote_after, bool) or promote_after < 1:
            raise ValueError(f"promote_after={promote_after!r} is invalid: must be an integer >= 1.")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"promote_window={window!r} is invalid: must be an integer >= 1.")
        self.promote_after = promote_after
        self.window = window
        self._blames: dict[str, deque[int]] = {}

    def blame(self, fqn: str, step: int) -> bool:
        """Record one blame; True when the module should be promoted now."""
        history = self._blames.setdefault(fqn, deque())
        history.append(step)
        while history and history[0] <= step - self.window:
            history.popleft()
        if len(history) >= self.promote_after:
            del self._blames[fqn]
            return True
        return False


class FallbackManager:
    """Which modules run in fp32 and why: static selection, per-precision defaults, run-time promotions.

    Args:
        fp32_modules: classes, fqn glob patterns or filters (see ``fp32_filter``) that always run in fp32.
        defaults: also run ``DEFAULT_FP32_MODULES[precision]`` in fp32.
        promote_after: blames within ``promote_window`` optimizer steps that promote a module.
        promote_window: see ``promote_after``.
    """

    def __init__(
        self, fp32_modules: Any = (), defaults: bool = True, promote_after: int = 2, promote_window: int = 100
    ):
        self.spec = fp32_modules
        self.filter = fp32_filter(fp32_modules) if fp32_modules else None
        self.defaults = defaults
        self.rule = PromotionRule(promote_after, promote_window)
        self.promotions: dict[str, Promotion] = {}

    def setup(self, model: nn.Module, precision: str, device_type: str) -> None:
        """Apply the static selection and the defaults. Raises if a glob pattern matches nothing."""
        if self.spec:
            misses = pattern_misses(self.spec, model)
            if misses:
                names = [fqn for fqn, _ in model.named_modules() if fqn]
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                hints = [hint for miss in misses for hint in prefixed_suggestions(miss, model)]
                hint = f" Did you mean {', '.join(hints)}? " if hints else " "
                raise ConfigError(
                    f"AdaptiveMP(fp32_modules=...) pattern(s) {misses} match no module of"
                    f" {type(model).__name__}.{hint}Names are relative to the model given to the plugin (the"
                    f" LightningModule); its modules are: {shown}."
                )
            for fqn in apply_fp32(model, self.filter, device_type):
                self.promotions[fqn] = Promotion(fqn, "static")
        default_types = DEFAULT_FP32_MODULES.get(precision, ()) if self.defaults else ()
        if default_types:
            for fqn in apply_fp32(model, by_type(*default_types), device_type):
                self.promotions[fqn] = Promotion(fqn, "default")

    def promote(
        self,
        model: nn.Module,
        fqn: str,
        reason: str,
        device_type: str,
        step: int | None = None,
        detail: str = "",
        scope: Scope = "module",
    ) -> bool:
        """Make ``fqn`` an fp32 island of ``scope`` now; False if it already was one."""
        if fqn in self.promotions or not apply_fp32(model, [fqn], device_type, scope):
            return False
        self.promotions[fqn] = Promotion(fqn, reason, step, detail, scope)
        return True

    def state_dict(self) -> list[dict[str, Any]]:
        return [vars(p).copy() for p in self.promotions.values() if p.reason not in ("static", "default")]

    def load_state_dict(self, model: nn.Module, promotions: list[dict[str, Any]], device_type: str) -> None:
        """Re-apply run-time promotions from a checkpoint, so a resumed run does not repeat their overflows."""
        names = {fqn for fqn, _ in model.named_modules()}
        for entry in promotions:
            if entry["module"] in names:
                fqn, reason, step, detail = entry["module"], entry["reason"], entry.get("step"), entry.get("detail", "")
                self.promote(model, fqn, reason, device_type, step, detail, entry.get("scope", "module"))
