"""One training run: its directory, the objects its config describes, ``trainer.fit``, and ``result.json``.

The checks that need no Lightning come first (the run directory, ``ckpt_path``), so a refusal is quick and
leaves nothing behind: a run refused before it trained removes the folders it created and the files a
logger writes at start-up. An exception inside ``fit`` that is not the user's mistake becomes
``TrainingFailed``, with its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mp.cli.errors import TrainingFailed, one_line
from lightning_mp.errors import ConfigError, invalid

__all__ = ["prepare_output_dir", "quiet_known_noise", "train"]


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
            allowed = f"{ckpt_path} does not exist; train once without ckpt_path first"
            raise invalid("ckpt_path", "last", allowed, problem="finds no checkpoint")
    elif ckpt_path is not None and not Path(os.path.expanduser(str(ckpt_path))).exists():
        allowed = "give a checkpoint file, or ckpt_path=last to resume the run in output_dir"
        raise invalid("ckpt_path", str(ckpt_path), allowed, problem="does not exist")

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_mp import AtomicCheckpointIO
    from lightning_mp.cli.run_callbacks import SaveConfig, Throughput, ValidationHistory
    from lightning_mp.formats import emulated

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _warn_about_devices(cfg)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    plugin = _build(cfg, "precision")
    logger = _build(cfg, "logger") if cfg.get("logger") else False
    throughput, history = Throughput(), ValidationHistory()
    callbacks = [_build(cfg, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    callbacks += [throughput, history, SaveConfig(cfg, output_dir / "config.yaml")]
    if plugin.options.attach_callbacks:
        # The plugin would add these at setup; given to the Trainer here, a resumed run finds them when
        # Lightning restores callback state (no "Please add the following callbacks" warning).
        from lightning_mp import LossScaleMonitor, OverflowDiagnostics, PrecisionReport

        callbacks = [LossScaleMonitor(), OverflowDiagnostics(), PrecisionReport(), *callbacks]
    # Atomic checkpoint writes: a run killed during a save keeps its previous last.ckpt intact.
    plugins = [plugin, AtomicCheckpointIO()]
    trainer = _build(cfg, "trainer", plugins=plugins, logger=logger, callbacks=callbacks)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except (ConfigError, MisconfigurationException, KeyboardInterrupt):
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
        "best_val_loss": min((p["val_loss"] for p in history.points if "val_loss" in p), default=None),
        "history": history.points,  # every validation: epoch, optimizer step, val_loss, val_acc
        "samples_per_s": throughput.samples_per_second,
        "ms_per_step": throughput.ms_per_batch,
        # Speed of a format this device only emulates (no bf16 or fp16 instructions on this CPU) says nothing
        # about hardware that has them.
        "speed_emulated": emulated(plugin.precision, plugin.device or "cpu"),
        "peak_memory_mb": peak_mb,
        # weights, gradients, optimizer state, fp32 master copies, compensation buffers (their real dtypes, at the
        # first step), their total, the same state's fp32 total and the share of it (lightning_mp.weights.memory)
        "state_bytes": dict(plugin.core.weights.memory),
        # bf16-true / 16-true: the remedy in force; every precision: lost updates per module at the last sample
        "master_weights": plugin.core.weights.remedy,
        "lost_updates": plugin.core.weights.lost.summary(),
        "lost_update_share": plugin.core.weights.lost.mean(),  # over the run's samples
        "lost_update_history": [list(point) for point in plugin.core.weights.lost.history],  # [[step, share]]
        # the same for the optimizer's per-element state (Adam's moments), over the run's samples
        "state_lost_update_share": plugin.core.weights.lost.state_mean(),
        "skipped_steps": plugin.skipped_steps,
        "fp32_promotions": [
            p.module for p in plugin.promotions if p.reason not in ("static", "default") and p.scope != "low_bit"
        ],
        # Every module that ran in fp32 at the end, and why: static (fp32_modules), default (fp16 norms and
        # softmax), overflow, kernel error, escalation; scope "module" (all of it) or "own_code" (its own operations).
        "fp32_modules": [
            {"module": p.module, "reason": p.reason, "step": p.step, "scope": p.scope}
            for p in plugin.promotions
            if p.scope != "low_bit"
        ],
        # fp8/int8: the layers converted, and those moved back to bf16 (with the step and why).
        "low_bit_layers": list(plugin.low_bit.converted),
        "low_bit_moved": [
            {"module": p.module, "reason": str(p.reason), "step": p.step, "detail": p.detail}
            for p in plugin.low_bit.moved.values()
            if p is not None
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
    try:
        log_dir = getattr(logger, "log_dir", None) if logger else None
    except Exception:  # noqa: BLE001 - the logger is what failed (logger.name=5): keep the error that says so
        return
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
        raise invalid("output_dir", str(cfg.output_dir), reason, problem="cannot be written") from None
    earlier = [p for p in (output_dir / "result.json", output_dir / "checkpoints" / "last.ckpt") if p.exists()]
    if earlier and cfg.ckpt_path is None and not cfg.get("overwrite", False):
        allowed = (
            "resume it with ckpt_path=last, train elsewhere with output_dir=..., or train over it with overwrite=true"
        )
        problem = f"already holds a run ({earlier[0].relative_to(output_dir)})"
        raise invalid("output_dir", str(cfg.output_dir), allowed, problem=problem)
    return output_dir


def _build(cfg: DictConfig, key: str, **objects: Any) -> Any:
    """The object the config node ``key`` describes: the plugin, the logger, a callback, the Trainer.

    Their constructors check their arguments with ``ValueError`` / ``TypeError`` too: AdaptiveMP
    (``fp32_modules=[5]``; most of its knobs were checked with the config already, see ``compose.check``), the
    Trainer (``strategy='foo'``, ``gradient_clip_val='abc'``). Every value of these nodes is the user's (the
    group's preset or ``key=value`` on the command line), so what such a constructor refuses is the user's
    mistake: one line naming the node, with the object's own message, which names the argument. The recipes'
    classes are not built here: they raise ``ConfigError`` for their knobs, and anything else is a bug.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(OmegaConf.select(cfg, key), **objects)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (ValueError, TypeError)) and not isinstance(cause, ConfigError):
            raise ConfigError(f"{key}: {one_line(cause)}") from error
        raise


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_noise() -> None:
    """Messages every run printed that say nothing to a user of this command."""
    # torchdata's StatefulDataLoader calls a deprecated torch function on every construction.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    # Lightning's model summary cannot size bf16/fp16 plugins it does not know; the summary is printed anyway.
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
    # Lightning's pytree helper on torch >= 2.10 (not ours, not actionable).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLitLoggerTip())  # an advertisement on every run
