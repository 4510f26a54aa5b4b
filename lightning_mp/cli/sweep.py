"""``lightning-mp train --multirun``: Hydra sweeps and launcher plugins, every job checked before any runs.

Hydra's own entry point owns the sweep and the launcher (``hydra/launcher=slurm``: submitit's SLURM launcher);
this module composes and checks every job of the sweep first, and gives each job its own run folder.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mp.cli.compose import check, compose, normalize_overrides
from lightning_mp.cli.help import CONFIG_MODULE
from lightning_mp.cli.keys import plugin_knob_overrides
from lightning_mp.cli.run import train
from lightning_mp.errors import ConfigError, invalid

__all__ = ["multirun", "sweep_jobs", "swept_keys"]


def multirun(argv: list[str]) -> None:
    """Hand ``train --multirun ...`` to Hydra's own entry point, which owns sweeps and launcher plugins
    (``hydra/launcher=slurm``: submitit's SLURM launcher, one task per device; Lightning reads SLURM's
    variables in each task). Every job composes the same ``train`` config as a single run, and every job
    of the sweep is composed and checked here first: a typo is one line now, not a failed cluster job."""
    import hydra

    overrides = [a for a in argv if a not in ("--multirun", "-m")]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}: train takes --multirun (or -m) and key=value overrides.")
    for job in sweep_jobs(overrides):
        try:
            cfg = compose(job, return_hydra_config=True)
        except Exception as error:
            # Without the plugin the preset's submitit_slurm is missing; with it, the error is a typo of Hydra's.
            if "hydra/launcher" in str(error) and "submitit" in str(error) and not _has_submitit():
                allowed, problem = 'pip install "lightning-mp[slurm]"', "needs Hydra's submitit launcher"
                raise invalid("hydra/launcher", "slurm", allowed, problem=problem, quote=False) from error
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

    check(cfg)
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
