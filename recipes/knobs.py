"""How a recipe declares its knobs: every class a recipe's config builds lists its arguments and what each accepts.

One declaration, checked twice: by the ``lightning-mp`` command on the composed config, before anything is built
(a bad value is one line in a second, without importing torch or Lightning), and by the class itself at
construction (code that builds it by hand gets the same error). A recipe package holds its declarations in its
own ``knobs.py`` as ``KNOBS = {class name: Knobs(...)}``; the shared classes of ``common.py`` are declared here.
Adding a knob to a recipe is adding the argument to its class and one line to its ``KNOBS``, e.g.::

    NET = Knobs("model.net", {..., "dropout": Number(minimum=0)})   # recipes/nlp/knobs.py

and nothing in the command line changes: it finds the declaration from the config's ``_target_``
(``knobs_of``), accepts ``model.net.dropout=...`` as a key, and refuses ``model.net.dropout=-1`` with
``model.net.dropout=-1 is invalid: must be a number >= 0.`` This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightning_mp.errors import invalid

__all__ = ["KNOBS", "Anything", "Choice", "Folder", "Integer", "Knobs", "Number", "check_config", "knobs_of"]


class Rule(Protocol):
    allowed: str  # what the error says is allowed: "must be an integer >= 1"

    def accepts(self, value: Any) -> bool: ...


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer:
    """An integer, at least ``minimum`` when given."""

    minimum: int | None = None

    @property
    def allowed(self) -> str:
        return "must be an integer" + (f" >= {self.minimum}" if self.minimum is not None else "")

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.minimum is None or value >= self.minimum)


@dataclass(frozen=True)
class Number:
    """A finite number (an integer too), greater than ``above`` or at least ``minimum`` when given."""

    above: float | None = None
    minimum: float | None = None

    @property
    def allowed(self) -> str:
        bound = f" > {self.above}" if self.above is not None else ""
        bound += f" >= {self.minimum}" if self.minimum is not None else ""
        return f"must be a number{bound}"

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return (self.above is None or value > self.above) and (self.minimum is None or value >= self.minimum)


@dataclass(frozen=True)
class Choice:
    """One of a few names."""

    options: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return f"must be one of {', '.join(self.options)}"

    def accepts(self, value: Any) -> bool:
        return value in self.options


@dataclass(frozen=True)
class Folder:
    """A directory path, or None for the recipe's built-in data. Whether it exists, and what it holds, is
    checked when the data are loaded (the error then names the file)."""

    allowed: str = "must be a directory path, or null for the built-in data"

    def accepts(self, value: Any) -> bool:
        return value is None or isinstance(value, (str, os.PathLike))


@dataclass(frozen=True)
class Anything:
    """No check here: an object built from its own config node (``model.net``), checked by its own ``Knobs``."""

    allowed: str = "anything"

    def accepts(self, value: Any) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class Knobs:
    """The arguments of one recipe class: what each accepts, and checks that involve several of them.

    Args:
        where: the config node that builds the class in the shipped recipes (``data``, ``model.net``); the
            errors name the knob under it. The command line passes the node it really checked.
        rules: argument name -> what it accepts; every argument of the class, in its order.
        checks: ``check(values, where)`` functions for rules across arguments; each raises ``invalid(...)``.
            ``values`` holds the arguments given (on the command line, the ones the config writes).
    """

    where: str
    rules: dict[str, Rule]
    checks: tuple[Callable[[Mapping[str, Any], str], None], ...] = field(default=())

    def check(self, values: Mapping[str, Any], where: str | None = None) -> None:
        """Raise ``ConfigError`` naming the first value in ``values`` that its rule refuses."""
        where = where or self.where
        for name, rule in self.rules.items():
            if name in values and not rule.accepts(values[name]):
                raise invalid(f"{where}.{name}", values[name], rule.allowed)
        for check in self.checks:
            check(values, where)


# ------------------------------------------------------------------------- the shared classes (common.py)
LR_SCHEDULES = ("cosine", "constant")

CLASSIFIER = Knobs(
    "model",
    {
        "net": Anything(),
        "num_classes": Integer(minimum=2),
        "lr": Number(above=0),
        "weight_decay": Number(minimum=0),
        "warmup_steps": Integer(minimum=0),
        "lr_schedule": Choice(LR_SCHEDULES),
    },
)

KNOBS = {"Classifier": CLASSIFIER}


# ------------------------------------------------------------------------------------- finding and checking
def knobs_of(target: str) -> Knobs | None:
    """The declaration of the recipe class a config's ``_target_`` names, or None (not a recipe class).

    ``lightning_mp.recipes.vision.VisionData`` -> ``KNOBS["VisionData"]`` in ``lightning_mp.recipes.vision.knobs``:
    the ``knobs`` module of the class's package (the named module itself when it is a package, else the package
    holding it: ``recipes.common.Classifier`` is declared here). Found without importing the class's module.
    """
    package = __name__.rpartition(".")[0]  # lightning_mp.recipes
    if not target.startswith(package + "."):
        return None
    module, _, name = target.rpartition(".")
    try:
        spec = importlib.util.find_spec(module)  # imports the packages above it only
        if spec is None:
            return None
        if spec.submodule_search_locations is None:
            module = module.rpartition(".")[0]
        declared = importlib.import_module(f"{module}.knobs")
    except ModuleNotFoundError:
        return None  # a target that does not import: Hydra names it when it is built
    return getattr(declared, "KNOBS", {}).get(name)


def check_config(config: Mapping[str, Any], path: str = "") -> None:
    """Check every node of a composed config (plain, resolved) that builds a recipe class against the class's
    ``Knobs``, in the config's order: ``data`` before ``model``, a model before its ``net``."""
    for key, node in config.items():
        if not isinstance(node, Mapping):
            continue
        where = f"{path}.{key}" if path else str(key)
        target = node.get("_target_")
        knobs = knobs_of(target) if isinstance(target, str) else None
        if knobs is not None:
            knobs.check(node, where)
        check_config(node, where)
