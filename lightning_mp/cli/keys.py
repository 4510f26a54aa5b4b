"""Every name typed on the command line must exist: a key nothing would read is refused with the nearest real one.

    reciep=nlp        'reciep' is not a key of the training config (nothing would read it). Did you mean recipe=nlp?
    data.batchsize=8  data.batchsize=8: 'batchsize' is not a key of data (VisionData). Did you mean data.batch_size=8?

What a node takes is read from the code, never listed here: a recipe class's declared knobs
(``lightning_mp.recipes.knobs``), the fields of ``PluginOptions`` / ``ScalerConfig`` for ``precision`` and
``precision.scaler``, and any other ``_target_``'s signature. Also here: ``plugin_knob_overrides``, which lets
those code-defined knobs be set without Hydra's ``+``.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from lightning_mp.errors import ConfigError

__all__ = ["GROUPS", "TOP_LEVEL_KEYS", "check_keys", "code_arguments", "plugin_knob_overrides", "unknown_key"]

GROUPS = ("recipe", "precision", "experiment", "trainer", "logger", "callbacks")
# Keys of conf/train.yaml and of what its groups put at the top level; anything else is read by nothing.
TOP_LEVEL_KEYS = (*GROUPS, "seed", "output_dir", "ckpt_path", "overwrite", "data", "model", "sweep_keys", "hydra")


def unknown_key(key: str, value: str | None) -> ConfigError:
    """A top-level key nothing reads (``reciep=nlp``), with the nearest real one written as it would work."""
    nearest = difflib.get_close_matches(key.split(".")[0], TOP_LEVEL_KEYS, n=1, cutoff=0.6)
    hint = f" Did you mean {nearest[0]}{'.' + key.split('.', 1)[1] if '.' in key else ''}" if nearest else ""
    hint += f"={value}?" if nearest and value is not None else ("?" if nearest else "")
    known = ", ".join(k for k in TOP_LEVEL_KEYS if k not in ("sweep_keys", "hydra"))
    return ConfigError(
        f"{key!r} is not a key of the training config (nothing would read it).{hint} Top-level keys: {known}."
    )


# -------------------------------------------------------------------------------------------- nested keys
# A key below the top level (data.batch_size, precision.scaler.growth_interval) must exist in the config the
# groups compose, or be an argument of the object its node builds. That is, in order:
#   1. a key of the composed config: any override of it is fine;
#   2. an argument of the node's object that the YAML leaves at its default: for a recipe class (data, model,
#      model.net) its declared knobs; for precision / precision.scaler the fields of PluginOptions / ScalerConfig
#      (AdaptiveMP / AdaptiveLossScaler); both read without importing Lightning; for any other node its
#      ``_target_``'s signature (trainer -> lightning.pytorch.Trainer, callbacks.<name> -> the callback).
#      trainer.* and precision.* are added for the user (plugin_knob_overrides, below); any other such argument
#      needs Hydra's +, as Hydra says;
#   3. anything else is a typo and is refused with the nearest real key, whether or not it is written with +
#      or ++: a + that adds a key nothing reads would train with the typo silently ignored. A node of a closed
#      object (every one we ship but the TensorBoard logger) can take no new key at all. Two exceptions:
#      - under a node whose object takes **kwargs (logger=tensorboard passes them to its SummaryWriter), + may
#        add a key that is not close to a real one (close is difflib's 0.6, as the suggestion uses);
#      - under callbacks, a dict of named callbacks, + may add a whole new callback: +callbacks.lr={_target_: ...}
#        (a null or a value there would be read by nothing: callbacks.early_stoping=null turns nothing off).
# A key under a null (callbacks.early_stopping.patience after experiment=quick turned early stopping off) is
# refused: nothing reads it, and + would put a dict without _target_ where a callback was.


def check_keys(overrides: list[Any], config: dict[str, Any]) -> None:
    """Refuse every override whose key nothing would read (the rules above), naming the nearest real key.
    ``config`` is a plain copy of the composed config: each override is checked against it as the ones before it
    left it."""
    for override in overrides:
        parts = override.key_or_group.split(".")
        if len(parts) < 2 or parts[0] == "hydra" or override.package is not None or override.is_sweep_override():
            continue  # top-level keys: compose.normalize_overrides; hydra.* and sweeps Hydra's
        _check_key(override, parts, config)
        # so that later overrides see this one (+callbacks.lr={_target_: ...} then callbacks.lr.x=1)
        parent = _get_path(config, parts[:-1])
        if isinstance(parent, dict):
            if override.is_delete():
                parent.pop(parts[-1], None)
            else:
                parent[parts[-1]] = override.value()


def _check_key(override: Any, parts: list[str], config: dict[str, Any]) -> None:
    """Walk ``parts`` down ``config``; at the first part that is not there, apply the rules above."""
    adding = override.is_add() or override.is_force_add()
    node: Any = config
    for depth, part in enumerate(parts):
        path, last = ".".join(parts[:depth]), depth == len(parts) - 1
        if node is None and depth > 0:  # + would put a dict without _target_ there: a traceback inside fit
            raise ConfigError(
                f"{override.input_line}: {path} is null here (a config or an override turned it off),"
                f" so nothing would read {part!r}."
            )
        if not isinstance(node, dict) or (depth == 0 and part not in node):
            return  # under a value, or a group removed (logger=null): Hydra names it
        if part in node:
            node = node[part]
            continue
        owner, arguments, open_ = _node_arguments(path, node)
        if part in arguments:
            if last or f"{path}.{part}" not in code_arguments():
                return  # an argument left at its default, or below one whose fields we do not know
            node = {}  # precision.scaler.<knob>: checked against the fields the code defines
            continue
        value = override.value()
        if last and adding and owner is None and _holds_named_configs(node):
            if isinstance(value, dict) and "_target_" in value:
                return  # a new callback
        nearest = _nearest_key(part, path, node, arguments)
        if last and adding and open_ and nearest is None:
            return  # a new keyword argument of an object that takes them
        raise ConfigError(_unknown_nested_key(override, parts[: depth + 1], config, node, nearest))


@functools.cache
def code_arguments() -> dict[str, tuple[str, set[str]]]:
    """Nodes whose arguments the code defines and the YAML writes only in part: path -> (object, argument names).
    Dataclass fields, so that checking a key needs no import of Lightning."""
    import dataclasses

    from lightning_mp.options import PluginOptions  # AdaptiveMP's knobs, without importing Lightning
    from lightning_mp.scaling import ScalerConfig

    return {
        "precision": ("AdaptiveMP", {field.name for field in dataclasses.fields(PluginOptions)}),
        "precision.scaler": ("AdaptiveLossScaler", {field.name for field in dataclasses.fields(ScalerConfig)}),
    }


def _node_arguments(path: str, node: dict[str, Any]) -> tuple[str | None, set[str], bool]:
    """What builds this node, the arguments it takes, and whether it takes any keyword (``**kwargs``)."""
    if path in code_arguments():
        owner, arguments = code_arguments()[path]
        return owner, arguments, False
    target = node.get("_target_")
    if not isinstance(target, str):
        return None, set(), False
    from lightning_mp.recipes.knobs import knobs_of

    declared = knobs_of(target)  # a recipe class: its declared knobs, without importing torch or Lightning
    if declared is not None:
        return target.rsplit(".", 1)[-1], set(declared.rules), False
    import inspect

    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate names it, with its error
        return target.rsplit(".", 1)[-1], set(), True
    arguments = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return target.rsplit(".", 1)[-1], arguments, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _holds_named_configs(node: dict[str, Any]) -> bool:
    """A dict of named objects (callbacks): every entry is a config with a ``_target_`` or null."""
    return bool(node) and all(v is None or (isinstance(v, dict) and "_target_" in v) for v in node.values())


def _nearest_key(part: str, path: str, node: dict[str, Any], arguments: set[str]) -> str | None:
    """The real key nearest to ``part``: first among its siblings (the node's keys and its object's arguments),
    then anywhere below the node (model.widht -> model.net.width). A full dotted path, or None."""
    siblings = sorted({k for k in node if not k.startswith("_")} | arguments)
    nearest = difflib.get_close_matches(part, siblings, n=1)
    if nearest:
        return f"{path}.{nearest[0]}"
    below: dict[str, str] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, child in tree.items():
            if isinstance(child, dict):
                for name in child:
                    if not name.startswith("_"):
                        below.setdefault(name, f"{prefix}.{key}.{name}")
                walk(child, f"{prefix}.{key}")

    walk(node, path)
    nearest = difflib.get_close_matches(part, sorted(below), n=1)
    return below[nearest[0]] if nearest else None


def _unknown_nested_key(
    override: Any, parts: list[str], config: dict[str, Any], node: dict[str, Any], nearest: str | None
) -> str:
    """One line: what was typed, which node has no such key, and the nearest real key written as an override
    that works (``+`` where Hydra needs it), else what the node takes."""
    typed = override.input_line
    path, part = ".".join(parts[:-1]), parts[-1]
    owner, arguments, open_ = _node_arguments(path, node)
    where = f"{path} ({owner})" if owner else path
    value = typed.partition("=")[2] if "=" in typed else None
    head = f"{typed}: {part!r} is not a key of {where}"
    if override.is_add() or override.is_force_add():
        head += ", so + cannot add it"
    if nearest is not None:
        if override.is_delete():
            fix = f"~{nearest}" + (f"={value}" if value is not None else "")
        else:
            exists = _get_path(config, nearest.split(".")) is not _MISSING
            added_for_you = plugin_knob_overrides([f"{nearest}={value}"])[0].startswith("++")
            fix = f"{'' if exists or added_for_you else '+'}{nearest}={value}"
        return f"{head}. Did you mean {fix}?"
    keys = sorted({k for k in node if not k.startswith("_")} | arguments)
    if owner is None and _holds_named_configs(node):
        return f"{head}. Its entries: {', '.join(keys)}; a new callback is a config: +{path}.{part}={{_target_: ...}}."
    takes = (
        f": it takes the arguments of {node.get('_target_', owner)}"
        if len(keys) > 16
        else f". It takes: {', '.join(keys)}"
    )
    if open_ and value is not None:
        takes += f"; {owner} passes other keys on: add one with +{path}.{part}={value}"
    return f"{head}{takes}."


_MISSING = object()


def _get_path(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def plugin_knob_overrides(overrides: list[str]) -> list[str]:
    """Let every argument of AdaptiveMP, AdaptiveLossScaler and the Trainer be overridden without Hydra's ``+``.

    ``conf/precision/*.yaml`` write only what differs from the code's defaults (the code stays the one source
    of truth), so most knobs are absent from the composed config and Hydra would refuse to override them. An
    override of a knob the code defines (``precision.<AdaptiveMP argument>``, ``precision.scaler.<ScalerConfig
    field>``) is turned into ``++`` (add or override); keys nothing reads were refused before (check_keys).
    """
    # Any Trainer argument, as the README promises (trainer.strategy=ddp): always add-or-override; a name the
    # Trainer does not take was refused by check_keys, with the nearest argument.
    overrides = [f"++{o}" if o.startswith("trainer.") and "=" in o else o for o in overrides]
    if not any(o.startswith("precision.") for o in overrides):
        return overrides  # nothing to look up: do not import Lightning for it
    knobs = {f"{path}.{name}" for path, (_, names) in code_arguments().items() for name in names}
    return [f"++{o}" if o.split("=", 1)[0] in knobs and "=" in o else o for o in overrides]
