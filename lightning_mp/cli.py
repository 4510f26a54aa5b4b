"""The ``lightning-mp`` command: ``train``, ``compare`` and ``ls`` over the Hydra configs in ``conf/``.

    lightning-mp train recipe=speech precision=fp16 precision.scaler.growth_interval=500
    lightning-mp compare recipe=vision precisions=fp32,bf16,fp16 trainer.max_epochs=3
    lightning-mp ls

Configs are composed with Hydra's compose API from ``pkg://lightning_mp.conf`` (shipped inside the package),
so the command works from any directory after a plain ``pip install``. Errors in what the user wrote
(an unknown option, a knob of the wrong type, an invalid scaler setting, a missing data folder) print one
line and exit with status 2 (``LIGHTNING_MP_DEBUG=1`` shows the traceback); nothing already written is touched.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import resource
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "lightning_mp.conf"
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
USAGE = """usage: lightning-mp train [key=value ...]
       lightning-mp train --multirun [hydra/launcher=slurm] [key=a,b ...]
       lightning-mp compare [precisions=fp32,bf16,fp16] [key=value ...]
       lightning-mp ls

Keys are Hydra overrides of conf/train.yaml, e.g. recipe=nlp precision=fp16 trainer.max_epochs=3
precision.scaler.growth_interval=500 logger=csv callbacks.early_stopping=null experiment=quick.
--multirun hands the command line to Hydra: sweeps (precision=fp32,bf16) and launcher plugins
(hydra/launcher=slurm submits through submitit; pip install "lightning-mp[slurm]")."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class TrainingFailed(RuntimeError):
    """An exception inside ``trainer.fit`` that is not about the user's input: printed with its traceback."""


# ---------------------------------------------------------------------------------------------- compose
def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The training config for these overrides (Hydra's compose API; no working-directory change)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = normalize_overrides(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    _check_group_options(parsed)
    groups = [o.input_line for o in parsed if _is_group_override(o)]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        # The config the groups compose, before any key=value: what every key typed must exist in.
        chosen = hydra_compose(config_name="train", overrides=groups)
        _check_keys([o for o in parsed if not _is_group_override(o)], OmegaConf.to_container(chosen, resolve=False))
        overrides = plugin_knob_overrides(overrides)
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)
    _validate(cfg)
    return cfg


# Lightning's spellings of the precisions, accepted as aliases of the precision group's options.
PRECISION_ALIASES = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16", "16": "fp16"}
GROUPS = ("recipe", "precision", "experiment", "trainer", "logger", "callbacks")
# Keys of conf/train.yaml and of what its groups put at the top level; anything else is read by nothing.
TOP_LEVEL_KEYS = (*GROUPS, "seed", "output_dir", "ckpt_path", "overwrite", "data", "model", "sweep_keys", "hydra")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """What users type, in the form Hydra takes, and typos refused before Hydra sees them.

    ``precision=16-mixed`` (and Lightning's other spellings) -> ``precision=fp16``; ``logger=null`` ->
    ``~logger``; a value starting with ``~/`` is expanded to the home directory (Hydra's lexer rejects it);
    a key nothing reads (``reciep=nlp``, ``+reciep=nlp``) is an error that suggests the nearest real key.
    """
    normalized = []
    for override in overrides:
        key, eq, value = override.partition("=")
        bare = key.lstrip("+~")
        root = bare.split(".")[0].split("/")[0]
        if eq and root not in TOP_LEVEL_KEYS:
            raise UsageError(_unknown_key(bare, value))
        if not eq:
            if bare and root not in TOP_LEVEL_KEYS:
                raise UsageError(_unknown_key(bare, None))
            normalized.append(override)
            continue
        if bare == "precision":
            value = ",".join(PRECISION_ALIASES.get(v.strip(), v.strip()) for v in value.split(","))
        if bare in GROUPS and value.strip().lower() in ("null", "none") and not key.startswith("~"):
            normalized.append(f"~{bare}")  # no logger / no callbacks: Hydra deletes a group with ~group
            continue
        if value == "~" or value.startswith("~/"):
            value = os.path.expanduser(value)
        normalized.append(f"{key}={value}")
    return normalized


def _unknown_key(key: str, value: str | None) -> str:
    import difflib

    nearest = difflib.get_close_matches(key.split(".")[0], TOP_LEVEL_KEYS, n=1, cutoff=0.6)
    hint = f" Did you mean {nearest[0]}{'.' + key.split('.', 1)[1] if '.' in key else ''}" if nearest else ""
    hint += f"={value}?" if nearest and value is not None else ("?" if nearest else "")
    known = ", ".join(k for k in TOP_LEVEL_KEYS if k not in ("sweep_keys", "hydra"))
    return f"{key!r} is not a key of the training config (nothing would read it).{hint} Top-level keys: {known}."


# How each group's options are named in an error: "recipe=visoin is not a recipe".
_GROUP_NOUNS = {
    "recipe": "a recipe",
    "precision": "a precision",
    "experiment": "an experiment",
    "trainer": "a trainer preset",
    "logger": "a logger",
    "callbacks": "a callbacks preset",
}


def _check_group_options(overrides: list[Any]) -> None:
    """An option that no file of its group holds (``recipe=visoin``) is refused naming the group's options and
    the nearest one, instead of Hydra's message with the config search path."""
    import difflib

    for override in overrides:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete() or override.is_sweep_override() or override.value() is None:
            continue  # a sweep is checked job by job; ~group and group=null remove the group
        option, options = str(override.value()), [name for name, _ in list_configs()[group]]
        if option not in options:
            nearest = difflib.get_close_matches(option, options, n=1)
            hint = f" Did you mean {nearest[0]}?" if nearest else ""
            raise UsageError(f"{group}={option} is not {_GROUP_NOUNS[group]}: choose from {', '.join(options)}.{hint}")


def _is_group_override(override: Any) -> bool:
    """``recipe=nlp``, ``~logger``, ``hydra/launcher=slurm``: a choice of config files, not a value."""
    return override.key_or_group in GROUPS or "/" in override.key_or_group


# -------------------------------------------------------------------------------------------- nested keys
# A key below the top level (data.batch_size, precision.scaler.growth_interval) must exist in the config the
# groups compose, or be an argument of the object its node builds. That is, in order:
#   1. a key of the composed config: any override of it is fine;
#   2. an argument of the node's object that the YAML leaves at its default: the node's ``_target_`` signature
#      (data -> VisionData, trainer -> lightning.pytorch.Trainer, callbacks.<name> -> the callback), and for
#      precision / precision.scaler the fields of PluginOptions / ScalerConfig (AdaptiveMP / AdaptiveLossScaler,
#      read without importing Lightning). trainer.* and precision.* are added for the user (plugin_knob_overrides);
#      any other such argument needs Hydra's +, as Hydra says;
#   3. anything else is a typo and is refused with the nearest real key, whether or not it is written with +
#      or ++: a + that adds a key nothing reads would train with the typo silently ignored. A node of a closed
#      object (every one we ship but the TensorBoard logger) can take no new key at all. Two exceptions:
#      - under a node whose object takes **kwargs (logger=tensorboard passes them to its SummaryWriter), + may
#        add a key that is not close to a real one (close is difflib's 0.6, as the suggestion uses);
#      - under callbacks, a dict of named callbacks, + may add a whole new callback: +callbacks.lr={_target_: ...}
#        (a null or a value there would be read by nothing: callbacks.early_stoping=null turns nothing off).
# A key under a null (callbacks.early_stopping.patience after experiment=quick turned early stopping off) is
# refused: nothing reads it, and + would put a dict without _target_ where a callback was.


def _check_keys(overrides: list[Any], config: dict[str, Any]) -> None:
    """Refuse every override whose key nothing would read (see above), naming the nearest real key. ``config``
    is a plain copy of the composed config: each override is checked against it as the ones before it left it."""
    for override in overrides:
        parts = override.key_or_group.split(".")
        if len(parts) < 2 or parts[0] == "hydra" or override.package is not None or override.is_sweep_override():
            continue  # top-level keys are normalize_overrides' to check; hydra.* and sweeps Hydra's
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
            raise UsageError(
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
            if last or f"{path}.{part}" not in _code_arguments():
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
        raise UsageError(_unknown_nested_key(override, parts[: depth + 1], config, node, nearest))


@functools.cache
def _code_arguments() -> dict[str, tuple[str, set[str]]]:
    """Nodes whose arguments the code defines and the YAML writes only in part: path -> (object, argument names).
    Dataclass fields, so that checking a key needs no import of Lightning."""
    import dataclasses

    from lightning_mp.options import PluginOptions  # AdaptiveMP's knobs, without importing Lightning
    from lightning_mp.scaling.policy import ScalerConfig

    return {
        "precision": ("AdaptiveMP", {field.name for field in dataclasses.fields(PluginOptions)}),
        "precision.scaler": ("AdaptiveLossScaler", {field.name for field in dataclasses.fields(ScalerConfig)}),
    }


def _node_arguments(path: str, node: dict[str, Any]) -> tuple[str | None, set[str], bool]:
    """What builds this node, the arguments it takes, and whether it takes any keyword (``**kwargs``)."""
    if path in _code_arguments():
        owner, arguments = _code_arguments()[path]
        return owner, arguments, False
    target = node.get("_target_")
    if not isinstance(target, str):
        return None, set(), False
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
    import difflib

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
    field>``) is turned into ``++`` (add or override); keys nothing reads were refused before (_check_keys).
    """
    # Any Trainer argument, as the README promises (trainer.strategy=ddp): always add-or-override; a name the
    # Trainer does not take was refused by _check_keys, with the nearest argument.
    overrides = [f"++{o}" if o.startswith("trainer.") and "=" in o else o for o in overrides]
    if not any(o.startswith("precision.") for o in overrides):
        return overrides  # nothing to look up: do not import Lightning for it
    knobs = {f"{path}.{name}" for path, (_, names) in _code_arguments().items() for name in names}
    return [f"++{o}" if o.split("=", 1)[0] in knobs and "=" in o else o for o in overrides]


_TRAINER_NUMBERS = ("max_epochs", "max_steps", "log_every_n_steps", "accumulate_grad_batches", "devices")


def _validate(cfg: DictConfig) -> None:
    output_dir = str(cfg.get("output_dir") or "").strip()
    if not output_dir:
        raise UsageError(
            "output_dir='' is invalid: must be a directory path, e.g. output_dir=outputs/my_run"
            " (an unset shell variable gives an empty value)."
        )
    if "precision" in cfg.trainer:
        raise UsageError(
            f"trainer.precision={cfg.trainer.precision!r} is not allowed: choose precision="
            f"{'|'.join(PRECISIONS)} (the precision group sets the AdaptiveMP plugin)."
        )
    for key in _TRAINER_NUMBERS:
        value = cfg.trainer.get(key)
        if value is not None and not isinstance(value, int) and not (key == "devices" and value == "auto"):
            raise UsageError(f"trainer.{key}={value!r} is invalid: must be an integer.")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"seed={seed!r} is invalid: must be an integer.")
    for key in cfg.data:
        if key in ("seed", "root", "_target_"):
            continue
        value = cfg.data[key]
        lowest = 2 if key == "num_classes" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise UsageError(f"data.{key}={value!r} is invalid: must be an integer >= {lowest}.")
    _validate_model(cfg.get("model") or {})
    accumulate = cfg.trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise UsageError(f"trainer.accumulate_grad_batches={accumulate} is invalid: must be an integer >= 1.")


# The recipes' model knobs: name -> (lowest allowed, whether the lowest itself is allowed, integer only).
_MODEL_NUMBERS = {"lr": (0, False, False), "weight_decay": (0, True, False), "warmup_steps": (0, True, True)}
_NET_INTEGERS = ("dim", "heads", "layers", "width")
_MODEL_CHOICES = {"lr_schedule": ("cosine", "constant")}  # as recipes.common.LR_SCHEDULES (not imported: slow)


def _validate_model(model: Any) -> None:
    """Wrong-typed or out-of-range model knobs are the user's input: refuse them before anything is built
    (inside ``fit`` they would surface as an optimizer's or a layer's error, with a traceback)."""
    for key, (lowest, inclusive, integer) in _MODEL_NUMBERS.items():
        value = model.get(key)
        if value is None:
            continue
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not number or value < lowest or (value == lowest and not inclusive):
            what = "an integer" if integer else "a number"
            raise UsageError(f"model.{key}={value!r} is invalid: must be {what} {'>=' if inclusive else '>'} {lowest}.")
    for key, allowed in _MODEL_CHOICES.items():
        value = model.get(key)
        if value is not None and value not in allowed:
            raise UsageError(f"model.{key}={value!r} is invalid: must be one of {', '.join(allowed)}.")
    net = model.get("net") or {}
    for key in _NET_INTEGERS:
        value = net.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"model.net.{key}={value!r} is invalid: must be an integer >= 1.")


# ------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe under one precision; write and return its ``result.json``. Reads top to bottom."""
    output_dir = Path(os.path.expanduser(str(cfg.output_dir)))
    created = [d for d in (output_dir, *output_dir.parents) if not d.exists()]  # deepest first
    try:
        return _train(cfg)
    except BaseException:
        for directory in created:  # a run that failed before writing anything leaves no empty folders
            with contextlib.suppress(OSError):
                directory.rmdir()  # only an empty one
        raise


def _train(cfg: DictConfig) -> dict[str, Any]:
    output_dir = prepare_output_dir(cfg)  # the checks that need no Lightning come first: a refusal is quick
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = output_dir / "checkpoints" / "last.ckpt"
        if not ckpt_path.exists():
            raise UsageError(f"ckpt_path=last but {ckpt_path} does not exist; train once without ckpt_path first.")
    elif ckpt_path is not None and not Path(os.path.expanduser(str(ckpt_path))).exists():
        raise UsageError(f"ckpt_path={str(ckpt_path)!r} does not exist.")

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_mp.checkpoint import AtomicCheckpointIO
    from lightning_mp.errors import ConfigError
    from lightning_mp.run_callbacks import SaveConfig, Throughput

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _warn_about_devices(cfg)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    plugin = instantiate(cfg.precision)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    throughput = Throughput()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [throughput, SaveConfig(cfg, output_dir / "config.yaml")]
    if plugin.options.attach_callbacks:
        # The plugin would add these at setup; given to the Trainer here, a resumed run finds them when
        # Lightning restores callback state (no "Please add the following callbacks" warning).
        from lightning_mp.reporting.callbacks import LossScaleMonitor, OverflowDiagnostics, PrecisionReport

        callbacks = [LossScaleMonitor(), OverflowDiagnostics(), PrecisionReport(), *callbacks]
    # Atomic checkpoint writes: a run killed during a save keeps its previous last.ckpt intact.
    plugins = [plugin, AtomicCheckpointIO()]
    trainer = instantiate(cfg.trainer, plugins=plugins, logger=logger, callbacks=callbacks)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except (ConfigError, UsageError, MisconfigurationException, KeyboardInterrupt):
        _remove_unused_log_dir(trainer, logger, output_dir)
        raise  # the user's data, patterns or Trainer settings, found while training starts: one line
    except Exception as error:
        _remove_unused_log_dir(trainer, logger, output_dir)
        raise TrainingFailed(f"training failed: {type(error).__name__}: {error}") from error

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux: the peak resident memory of this process
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "recipe": cfg.recipe_name,
        "precision": cfg.precision_name,
        "resolved_precision": plugin.precision,
        "val_acc": metrics.get("val/acc"),
        "val_loss": metrics.get("val/loss"),
        "best_val_acc": _best_val_acc(trainer),
        "samples_per_s": throughput.samples_per_second,
        "peak_memory_mb": peak_mb,
        "skipped_steps": plugin.skipped_steps,
        "fp32_promotions": [p.module for p in plugin.promotions if p.reason not in ("static", "default")],
        # Every module that ran in fp32 at the end, and why: static (fp32_modules), default (fp16 norms and
        # softmax), overflow, kernel error, escalation; scope "module" (all of it) or "own_code" (its own operations).
        "fp32_modules": [
            {"module": p.module, "reason": p.reason, "step": p.step, "scope": p.scope} for p in plugin.promotions
        ],
        "optimizer_steps": plugin.optimizer_steps,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _warn_about_devices(cfg: DictConfig) -> None:
    """More CPU processes than cores is accepted by Lightning and crawls: say so before it starts."""
    devices, accelerator = cfg.trainer.get("devices"), str(cfg.trainer.get("accelerator", "auto"))
    cores = os.cpu_count() or 1
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(devices, int) and devices > cores:
        print(
            f"lightning-mp: warning: trainer.devices={devices} on a CPU with {cores} cores: each of the {devices}"
            " processes gets less than a core, so training is much slower than trainer.devices=1.",
            file=sys.stderr,
        )


# What a logger writes when a run starts, before anything was trained: removable when the run fails then.
_STARTUP_LOG_FILES = ("events.out.tfevents.*", "hparams.yaml", "metrics.csv")


def _remove_unused_log_dir(trainer: Any, logger: Any, output_dir: Path) -> None:
    """A run that failed before its first optimizer step leaves no ``version_N`` folder behind: only the files
    a logger writes at start-up are removed, and then the folders left empty inside ``output_dir``."""
    log_dir = getattr(logger, "log_dir", None) if logger else None
    if log_dir is None or trainer.global_step > 0:
        return
    path, root = Path(log_dir).resolve(), output_dir.resolve()
    if not (path.is_dir() and root in path.parents):
        return
    files = list(path.iterdir())
    if not all(f.is_file() and any(f.match(pattern) for pattern in _STARTUP_LOG_FILES) for f in files):
        return  # something else is in there: not ours to delete
    for f in files:
        f.unlink()
    while path != root and root in path.parents and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def _best_val_acc(trainer: Any) -> float | None:
    """The best validation accuracy of the run (what the checkpoint monitoring val/acc kept), if any."""
    for callback in trainer.checkpoint_callbacks:
        score = getattr(callback, "best_model_score", None)
        if getattr(callback, "monitor", None) == "val/acc" and score is not None:
            return float(score)
    return None


def prepare_output_dir(cfg: DictConfig) -> Path:
    """The run directory, created and checked before anything is built: writable, and not holding an earlier
    run that this one would silently mix with (resume it with ``ckpt_path=last`` or pass ``overwrite=true``)."""
    output_dir = Path(os.path.expanduser(str(cfg.output_dir)))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".lightning-mp-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"output_dir={str(cfg.output_dir)!r} cannot be written: {reason}.") from None
    earlier = [p for p in (output_dir / "result.json", output_dir / "checkpoints" / "last.ckpt") if p.exists()]
    if earlier and cfg.ckpt_path is None and not cfg.get("overwrite", False):
        raise UsageError(
            f"output_dir={str(cfg.output_dir)!r} already holds a run ({earlier[0].relative_to(output_dir)}): resume it"
            " with ckpt_path=last, train elsewhere with output_dir=..., or train over it with overwrite=true."
        )
    return output_dir


# ---------------------------------------------------------------------------------------------- multirun
def multirun(argv: list[str]) -> None:
    """Hand ``train --multirun ...`` to Hydra's own entry point, which owns sweeps and launcher plugins
    (``hydra/launcher=slurm``: submitit's SLURM launcher, one task per device; Lightning reads SLURM's
    variables in each task). Every job composes the same ``train`` config as a single run, and every job
    of the sweep is composed and checked here first: a typo is one line now, not a failed cluster job."""
    import hydra

    overrides = [a for a in argv if a not in ("--multirun", "-m")]
    if any(a.startswith("-") for a in overrides):
        raise UsageError(f"unknown option {next(a for a in overrides if a.startswith('-'))!r}: only --multirun.")
    for job in sweep_jobs(overrides):
        try:
            cfg = compose(job, return_hydra_config=True)
        except Exception as error:
            # Without the plugin the preset's submitit_slurm is missing; with it, the error is a typo of Hydra's.
            if "hydra/launcher" in str(error) and "submitit" in str(error) and not _has_submitit():
                raise UsageError(
                    'hydra/launcher=slurm needs Hydra\'s submitit launcher: pip install "lightning-mp[slurm]".'
                ) from error
            raise
        # Resolve the launcher's settings now, for every job: the SLURM preset's nodes and tasks come from
        # the trainer group, and trainer.devices=auto cannot size an allocation (an error naming the field
        # and the value). Nodes and tasks first, so that is the field the error names.
        launcher = cfg.hydra.launcher
        for key in ("nodes", "tasks_per_node"):
            launcher.get(key)
        OmegaConf.to_container(launcher, resolve=True)

    hydra_main = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="train", version_base="1.3")
    saved_argv = sys.argv
    # Every job gets its own folder: the swept keys not already in output_dir's default name the subfolder.
    swept = [k for k in swept_keys(overrides) if k not in ("recipe", "precision", "output_dir")]
    sweep = [f"sweep_keys=[{','.join(swept)}]"] if swept else []
    sys.argv = ["lightning-mp", "--multirun", *plugin_knob_overrides(normalize_overrides(overrides)), *sweep]
    try:
        hydra_main(_multirun_job)()
    finally:
        sys.argv = saved_argv


def _has_submitit() -> bool:
    from importlib.util import find_spec

    return find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep varies (``seed=0,1`` -> ``seed``), as Hydra's override parser reads them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(normalize_overrides(overrides))
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a sweep (``precision=fp32,bf16 seed=0,1`` gives four), using
    Hydra's own override parser so choice and range sweeps expand exactly as Hydra's sweeper expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(normalize_overrides(overrides)):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def _multirun_job(cfg: DictConfig) -> dict[str, Any]:
    """One job of a multirun, possibly on another machine (submitit pickles this function by name).

    Its run folder is ``output_dir/<swept key=value,...>`` (``outputs/nlp/bf16/seed=1``), so jobs that differ
    only in a swept key other than recipe and precision never share a folder."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    _validate(cfg)
    keys = list(cfg.get("sweep_keys") or [])
    if keys:
        mine = {}
        for override in HydraConfig.get().overrides.task:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in keys:
                mine[key.lstrip("+~")] = value.replace("/", "_")
        with open_dict(cfg):
            cfg.output_dir = str(Path(str(cfg.output_dir)) / ",".join(f"{k}={mine[k]}" for k in keys if k in mine))
    return train(cfg)


# ----------------------------------------------------------------------------------------------- compare
def compare(overrides: list[str]) -> list[dict[str, Any]]:
    """Train the same recipe under each precision, ``seeds=N`` times each (one process per run, so peak memory
    is per run), and print and save a table of means and spreads, relative to fp32, with a verdict per
    precision (see ``verdict``)."""
    precisions, seeds, rest = _split_precisions(overrides)
    cfg = compose(rest)  # fail fast on a bad override, before the first run
    out = Path(os.path.expanduser(str(cfg.output_dir))).parent / "compare"
    if (out / "compare.json").exists() and not cfg.overwrite:
        raise UsageError(
            f"{out} already holds a comparison (compare.json): compare into another output_dir=..., or replace it"
            " with overwrite=true."
        )
    if cfg.overwrite:
        rest = [*[o for o in rest if not o.startswith("overwrite=")], "overwrite=true"]
    rest = [o for o in rest if not o.startswith("seed=")]
    runs = [(name, cfg.seed + i) for name in precisions for i in range(seeds)]
    rows = []
    for index, (name, seed) in enumerate(runs, start=1):
        run_dir = out / name / f"seed={seed}" if seeds > 1 else out / name
        print(f"[{index}/{len(runs)}] {cfg.recipe_name} under {name}, seed {seed} -> {run_dir}", flush=True)
        command = [sys.executable, "-m", "lightning_mp.cli", "train", *rest]
        command += [f"precision={name}", f"seed={seed}", f"output_dir='{run_dir}'"]  # quoted: the path has '='
        proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise UsageError(f"the {name} run (seed {seed}) failed with exit status {proc.returncode}; see above.")
        rows.append({**json.loads((run_dir / "result.json").read_text()), "seed": seed})
    table = comparison_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(comparison_markdown(table) + "\n" + VERDICT_RULE + "\n")
    _print_table(table, title=f"{cfg.recipe_name}: precision comparison, {seeds} seed(s) each ({out})")
    print(VERDICT_RULE)
    return rows


def _split_precisions(overrides: list[str]) -> tuple[list[str], int, list[str]]:
    precisions, seeds, rest = ["fp32", "bf16", "fp16"], 1, []
    for item in overrides:
        if item.startswith("precisions="):
            precisions = [p.strip() for p in item.split("=", 1)[1].strip("[]").split(",") if p.strip()]
            precisions = [PRECISION_ALIASES.get(p, p) for p in precisions]
        elif item.startswith("seeds="):
            value = item.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"seeds={value!r} is invalid: must be an integer >= 1 (runs per precision).")
            seeds = int(value)
        elif item.startswith("precision="):
            raise UsageError("compare runs several precisions: use precisions=fp32,bf16,fp16, not precision=.")
        else:
            rest.append(item)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise UsageError(f"precisions={','.join(precisions)!r} is invalid: choose from {', '.join(PRECISIONS)}.")
    return precisions, seeds, rest


COLUMNS = (
    ("precision", "precision"),
    ("runs", "seeds"),
    ("val_acc", "final val acc"),
    ("d_acc", "vs fp32"),
    ("best_val_acc", "best val acc"),
    ("d_best", "vs fp32"),
    ("val_loss", "val loss"),
    ("samples_per_s", "samples/s"),
    ("speedup", "speed vs fp32"),
    ("peak_memory_mb", "peak MB"),
    ("skipped_steps", "skipped"),
    ("fp32_promotions", "fp32 promotions"),
    ("verdict", "verdict"),
)

VERDICT_RULE = (
    "verdict: a precision is within noise of fp32 when, for the final and for the best validation accuracy,"
    " |mean - fp32 mean| <= max(2 x the standard error of the difference, 0.005), the standard error being"
    " sqrt(s^2/n + s_fp32^2/n_fp32) over the seeds; with one seed there is no spread to judge by."
)


def _stats(values: list[float]) -> tuple[float | None, float | None, int]:
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def verdict(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """Whether ``runs`` (one precision, several seeds) is within noise of ``reference`` (fp32): see
    ``VERDICT_RULE``; judged on the final and on the best validation accuracy."""
    if runs is reference:
        return "reference"
    parts = []
    for key, label in (("val_acc", "final"), ("best_val_acc", "best")):
        mean, sd, n = _stats([r.get(key) for r in runs])
        ref_mean, ref_sd, ref_n = _stats([r.get(key) for r in reference])
        if mean is None or ref_mean is None:
            continue
        if sd is None or ref_sd is None:
            return "one seed: no verdict (use seeds=3)"
        bound = max(2 * math.sqrt(sd**2 / n + ref_sd**2 / ref_n), 0.005)
        diff = mean - ref_mean
        if abs(diff) > bound:
            parts.append(f"{label} {diff:+.3f} (beyond {bound:.3f})")
    return "within noise of fp32" if not parts else "differs from fp32: " + ", ".join(parts)


def comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of display strings per precision (means and spreads over its seeds), relative to fp32 (or the
    first precision when fp32 did not run), with a verdict."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["precision"], []).append(r)
    reference = groups.get("fp32", next(iter(groups.values())))

    def mean(runs, key):
        return _stats([r.get(key) for r in runs])[0]

    def spread(runs, key, fmt):
        m, sd, _ = _stats([r.get(key) for r in runs])
        if m is None:
            return "-"
        return fmt.format(m) + (f" +- {fmt.format(sd)}" if sd is not None else "")

    table = []
    for name, runs in groups.items():
        acc, base_acc = mean(runs, "val_acc"), mean(reference, "val_acc")
        best, base_best = mean(runs, "best_val_acc"), mean(reference, "best_val_acc")
        speed, base_speed = mean(runs, "samples_per_s"), mean(reference, "samples_per_s")
        resolved = runs[0].get("resolved_precision")
        promotions = sorted({m for r in runs for m in r.get("fp32_promotions") or []})
        table.append(
            {
                "precision": name + (f" ({resolved})" if name == "auto" else ""),
                "runs": str(len(runs)),
                "val_acc": spread(runs, "val_acc", "{:.3f}"),
                "d_acc": _num(acc - base_acc if acc is not None and base_acc is not None else None, "{:+.3f}"),
                "best_val_acc": spread(runs, "best_val_acc", "{:.3f}"),
                "d_best": _num(best - base_best if best is not None and base_best is not None else None, "{:+.3f}"),
                "val_loss": spread(runs, "val_loss", "{:.3f}"),
                "samples_per_s": spread(runs, "samples_per_s", "{:.0f}"),
                "speedup": _num(speed / base_speed if speed and base_speed else None, "{:.2f}x"),
                "peak_memory_mb": _num(mean(runs, "peak_memory_mb"), "{:.0f}"),
                "skipped_steps": _num(mean(runs, "skipped_steps"), "{:g}"),
                "fp32_promotions": ", ".join(promotions) or "-",
                "verdict": verdict(runs, reference),
            }
        )
    return table


def _num(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "-"


def comparison_markdown(table: list[dict[str, str]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    lines = ["| " + " | ".join(row[key] for key, _ in COLUMNS) + " |" for row in table]
    return "\n".join([header, rule, *lines]) + "\n"


def _print_table(table: list[dict[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title=title)
    for _, name in COLUMNS:
        rich_table.add_column(name, overflow="fold")
    for row in table:
        rich_table.add_row(*(row[key] for key, _ in COLUMNS))
    # Piped or captured output has no terminal width (rich assumes 80 and cuts the headers): give it room.
    console = Console()
    Console(width=None if console.is_terminal else 160).print(rich_table)


# ------------------------------------------------------------------------------------------------------ ls
def list_configs() -> dict[str, list[tuple[str, str]]]:
    """Recipes, precisions and experiments found in the shipped conf/, each with its one-line header."""
    found = {}
    root = resources.files(CONFIG_MODULE)
    for group in ("recipe", "precision", "experiment", "trainer", "logger", "callbacks", "hydra/launcher"):
        entries = []
        for item in sorted(root.joinpath(group).iterdir(), key=lambda p: p.name):
            if item.name.endswith(".yaml"):
                entries.append((item.name.removesuffix(".yaml"), _description(item.read_text())))
        found[group] = entries
    return found


def command_help(command: str) -> str:
    """``lightning-mp train --help`` / ``compare --help``: the groups and the knobs most runs change."""
    import dataclasses

    from lightning_mp.options import PluginOptions  # AdaptiveMP's knobs, without importing Lightning
    from lightning_mp.scaling.policy import ScalerConfig

    if command == "compare":
        head = [
            "usage: lightning-mp compare [precisions=fp32,bf16,fp16] [key=value ...]",
            "",
            "Train one recipe under each precision (one process each) and print accuracy, speed, memory and skipped",
            "steps side by side, relative to fp32; writes compare.json and compare.md next to the runs.",
            "Every key=value below applies to every run; precision= is replaced by precisions=.",
            "seeds=3 runs each precision with seeds seed..seed+2 and reports mean +- spread and a verdict per",
            "precision (within noise of fp32 or not, on the final and the best validation accuracy).",
        ]
    else:
        head = [
            "usage: lightning-mp train [key=value ...]",
            "       lightning-mp train --multirun [key=a,b ...]   (a sweep: one run per combination)",
            "",
            "Train one recipe under one precision; logs, checkpoints, the precision report and result.json",
            "go to output_dir.",
        ]
    lines = [*head, "", "config groups (group=option):"]
    for group, entries in list_configs().items():
        if group == "hydra/launcher" and command != "train":
            continue
        lines.append(f"  {group + ':':16}" + ", ".join(name for name, _ in entries))
    adaptive = [f.name for f in dataclasses.fields(PluginOptions) if f.name not in ("precision", "device", "scaler")]
    scaler = [f.name for f in dataclasses.fields(ScalerConfig)]
    lines += [
        "  precision also takes Lightning's names: 32-true, bf16-mixed, 16-mixed, 32, 16",
        "",
        "common keys:",
        "  seed=0  output_dir=outputs/<recipe>/<precision>  ckpt_path=last (resume)  overwrite=true  logger=null",
        "  trainer.max_epochs=3  trainer.max_steps=200  trainer.devices=1  trainer.<any Trainer argument>=...",
        "  data.batch_size=64  data.root=~/data (the recipe's real dataset instead of its generated one)",
        "  precision.<knob>=...   " + ", ".join(adaptive),
        "  precision.scaler.<knob>=...   " + ", ".join(scaler),
        "",
        "lightning-mp ls lists every option with a line about it; the README explains each knob.",
    ]
    return "\n".join(lines)


def _description(text: str) -> str:
    """A config's opening comment, whole sentences: its lines up to the first example command or blank."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("@package"):
            continue
        if not body or body.startswith("lightning-mp "):
            break
        lines.append(body)
    return " ".join(lines)


def _print_configs() -> None:
    import shutil
    import textwrap

    width = max(shutil.get_terminal_size((100, 20)).columns, 60)
    for group, entries in list_configs().items():
        print(f"{group}:")
        for name, description in entries:
            wrapped = textwrap.wrap(description, width=width - 17) or [""]
            print(f"  {name:14} {wrapped[0]}")
            for more in wrapped[1:]:
                print(" " * 17 + more)


# ------------------------------------------------------------------------------------------------------ main
def _one_line(error: BaseException) -> str:
    """Reduce Hydra/OmegaConf/instantiate errors (often multi-line and wrapped) to the line that matters."""
    from hydra.errors import InstantiationException

    key = ""
    if isinstance(error, InstantiationException):
        text = str(error)
        for line in text.splitlines():
            if line.startswith("full_key:"):
                key = line.split(":", 1)[1].strip() + ": "
        cause = error.__cause__ or error.__context__
        if cause is not None:
            return key + _one_line(cause)
    lines: list[str] = []
    for raw in str(error).splitlines():
        if raw.strip() == "Config search path:":
            break
        if raw.startswith("\t") and lines:  # an item of the list the line above opens ("Available options:")
            lines[-1] += (" " if lines[-1].endswith(":") else ", ") + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    # Sentences run on ("Could not override 'x'. To append ..."); other lines are separated by semicolons.
    text = "".join(line + (" " if line.endswith(".") else "; ") for line in lines[:-1]) + "".join(lines[-1:])
    text = text or type(error).__name__
    return key + text.replace("\t", "")


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_known_noise() -> None:
    """Messages every run printed that say nothing to a user of this command."""
    # torchdata's StatefulDataLoader calls a deprecated torch function on every construction.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    # Lightning's model summary cannot size bf16/fp16 plugins it does not know; the summary is printed anyway.
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
    # Lightning's pytree helper on torch >= 2.10 (not ours, not actionable).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLitLoggerTip())  # an advertisement on every run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command == "help" or (command in ("train", "compare") and ({"-h", "--help", "help"} & set(overrides))):
        topic = overrides[0] if command == "help" and overrides else command
        try:
            print(command_help(topic) if topic in ("train", "compare") else USAGE)
        except BrokenPipeError:
            _reader_left()
        return 0
    _quiet_known_noise()
    try:
        if command == "train" and ("--multirun" in overrides or "-m" in overrides):
            multirun(overrides)
        elif command == "train":
            train(compose(overrides))
        elif command == "compare":
            compare(overrides)
        elif command == "ls":
            _print_configs()
        else:
            raise UsageError(f"unknown command {command!r}: expected train, compare or ls.")
    except KeyboardInterrupt:
        print("lightning-mp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _reader_left()
        return 0
    except Exception as error:  # noqa: BLE001 - user input errors become one line; others keep their trace
        if not _is_user_error(error) or os.environ.get("LIGHTNING_MP_DEBUG"):
            raise
        print(f"lightning-mp: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _reader_left() -> None:
    """``lightning-mp ls | head``: the reader closed the pipe. Not an error; send what is left of the output
    (and Python's flush at exit) to /dev/null instead of a BrokenPipe traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _is_user_error(error: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user = (UsageError, HydraException, OmegaConfBaseException, ValueError, TypeError, FileNotFoundError)
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")  # only if Lightning was imported
    if exceptions is not None:
        user = (*user, exceptions.MisconfigurationException)
    return isinstance(error, user) and not isinstance(error, TrainingFailed)


if __name__ == "__main__":
    sys.exit(main())
