"""A command line -> the checked training config: Hydra's compose API over ``pkg://lightning_mp.conf``.

In order, each step refusing with one line before the next runs (none imports Lightning):

1. what users type is put in Hydra's form (``precision=16-mixed``, ``logger=null``, ``~/``), and a top-level
   key nothing reads is refused (``keys.unknown_key``);
2. a group option no file holds (``recipe=visoin``) is refused with the group's options;
3. every nested key must exist in the config the groups compose, or be an argument of its object
   (``keys.check_keys``);
4. the composed values are checked (``check``): the run's own keys here (output_dir, seed, trainer), each
   recipe class's knobs by its own declaration (``lightning_mp.recipes.knobs``), AdaptiveMP's by its own options.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mp.cli.help import CONFIG_MODULE, list_configs
from lightning_mp.cli.keys import GROUPS, TOP_LEVEL_KEYS, check_keys, plugin_knob_overrides, unknown_key
from lightning_mp.errors import ConfigError, invalid

__all__ = ["PRECISIONS", "PRECISION_ALIASES", "check", "compose", "normalize_overrides"]

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "bf16-true", "fp16-true", "auto")
# Lightning's spellings of the precisions, accepted as aliases of the precision group's options.
PRECISION_ALIASES = {
    "32-true": "fp32",
    "32": "fp32",
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
    "16": "fp16",
    "fp8-mixed": "fp8",
    "int8-mixed": "int8",
    "16-true": "fp16-true",
}


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
        check_keys([o for o in parsed if not _is_group_override(o)], OmegaConf.to_container(chosen, resolve=False))
        overrides = plugin_knob_overrides(overrides)
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)
    check(cfg)
    return cfg


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
            raise unknown_key(bare, value)
        if not eq:
            if bare and root not in TOP_LEVEL_KEYS:
                raise unknown_key(bare, None)
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
            allowed = f"choose from {', '.join(options)}." + (f" Did you mean {nearest[0]}?" if nearest else "")
            raise invalid(group, option, allowed, problem=f"is not {_GROUP_NOUNS[group]}", quote=False)


def _is_group_override(override: Any) -> bool:
    """``recipe=nlp``, ``~logger``, ``hydra/launcher=slurm``: a choice of config files, not a value."""
    return override.key_or_group in GROUPS or "/" in override.key_or_group


# ------------------------------------------------------------------------------------------------ values
_TRAINER_INTEGERS = ("max_epochs", "max_steps", "log_every_n_steps", "accumulate_grad_batches", "devices")


def check(cfg: DictConfig) -> None:
    """Refuse a composed config whose values nothing can run with, before anything is built: the run's own keys
    (this command's: train.yaml and the trainer group), then every recipe class's knobs by its own declaration,
    then AdaptiveMP's knobs by its own validation."""
    output_dir = str(cfg.get("output_dir") or "").strip()
    if not output_dir:
        allowed = (
            "must be a directory path, e.g. output_dir=outputs/my_run (an unset shell variable gives an empty value)"
        )
        raise invalid("output_dir", output_dir, allowed)
    if "precision" in cfg.trainer:
        allowed = f"choose precision={'|'.join(PRECISIONS)} (the precision group sets the AdaptiveMP plugin)"
        raise invalid("trainer.precision", cfg.trainer.precision, allowed, problem="is not allowed")
    for key in _TRAINER_INTEGERS:
        value = cfg.trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            if not (key == "devices" and value == "auto"):
                raise invalid(f"trainer.{key}", value, "must be an integer" + (" or auto" if key == "devices" else ""))
    accumulate = cfg.trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise invalid("trainer.accumulate_grad_batches", accumulate, "must be an integer >= 1")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise invalid("seed", seed, "must be an integer")

    from lightning_mp.recipes.knobs import check_config  # torch- and Lightning-free

    check_config({key: cfg[key] for key in cfg if key != "hydra"})
    _check_plugin_knobs(cfg.get("precision"))


def _check_plugin_knobs(node: DictConfig | None) -> None:
    """AdaptiveMP's own validation of the precision knobs, run now instead of inside ``instantiate``.

    ``PluginOptions`` is every argument of ``AdaptiveMP`` validated at its construction, and nothing else: what it
    raises is about a value the precision config or the command line gave (``precision.stats=most``,
    ``precision.scaler.growth_factor=0.5``), so it is the user's mistake, printed as one line. It raises
    ``ValueError`` / ``TypeError`` today; once it raises ``ConfigError`` this conversion does nothing.
    """
    if node is None or node.get("_target_") != "lightning_mp.AdaptiveMP":
        return  # no plugin, or another one: its own constructor checks its arguments
    from lightning_mp.options import PluginOptions  # imports torch, not Lightning

    knobs = {key: value for key, value in OmegaConf.to_container(node, resolve=True).items() if key[0] != "_"}
    try:
        PluginOptions(**knobs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
