"""Which modules: a filter ``(module, fqn) -> bool`` decides, in the torchao float8 shape. ``fp32_filter`` builds
one from what users naturally write: module classes, fqn glob patterns, or a filter. ``by_type`` and ``by_name``
are the two helpers underneath; ``pattern_misses`` finds the patterns that match nothing (usually a typo).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = ["ModuleFilter", "by_name", "by_type", "fp32_filter", "pattern_misses", "prefixed_suggestions"]

ModuleFilter = Callable[[nn.Module, str], bool]


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


def fp32_filter(spec: Any, knob: str = "fp32_modules") -> ModuleFilter:
    """Build one filter from what a user wrote: a class, a glob pattern, a filter, or a sequence of those
    (``knob``: the argument it came from, for the error message).

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
                f"{knob} entry {item!r} is invalid: expected an nn.Module class, an fqn glob pattern"
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
