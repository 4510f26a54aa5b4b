"""Thin Lightning callbacks over what ``AdaptiveMP`` decides and measures. Each works alone; the plugin adds
all three to a Trainer that has none of them.

Logged names (stable; any Lightning logger):

``precision/loss_scale``, ``precision/skipped_steps``, ``precision/overflow_events``, ``precision/fp32_modules``
    by ``LossScaleMonitor``, every ``log_every_n_steps`` optimizer steps;
``precision/headroom_bits/<fqn>`` (lowest of activation and gradient), ``precision/underflow/<fqn>`` (fp16)
    by ``OverflowDiagnostics``, for the ``top_k`` modules with the least headroom, after each sampled step;
``precision/low_bit/snr_db/<fqn>`` and ``precision/low_bit/underflow/<fqn>`` (fp8/int8 layers), by the same.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_mp._compat import skip_inherited_batch_hooks
from lightning_mp.plugin import adaptive_plugin as _plugin
from lightning_mp.reporting.history import ScaleHistory
from lightning_mp.reporting.report import (
    build_report,
    render_table,
    run_metrics,
    sampled_metrics,
    write_report,
)

__all__ = ["LossScaleMonitor", "OverflowDiagnostics", "PrecisionReport", "attach_default_callbacks"]


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class LossScaleMonitor(pl.Callback):
    """Logs the loss scale, skipped steps, overflow events and fp32 modules every ``log_every_n_steps``
    optimizer steps, and shows the plugin's scale history.

    The history itself is the plugin's (``AdaptiveMP.scale_history``, saved in the plugin's checkpoint
    state), so this callback keeps no state of its own: a run resumed without it, or with the plugin adding it
    again, restores the whole history and Lightning has no callback state to ask for.

    Args:
        max_points: the most ``(step, scale)`` points the plugin keeps. The history starts with every optimizer
            step; when it would exceed this, every other point is dropped and from then on only every second
            (fourth, ...) step is recorded, so memory stays bounded on any run length with an even resolution
            over the whole run. ``history()`` always ends with the latest step.
    """

    def __init__(self, max_points: int = 4096) -> None:
        self.scales = ScaleHistory(max_points)  # validates; replaced by the plugin's history at fit start
        self._steps_seen = 0
        skip_inherited_batch_hooks(self)  # Lightning calls each empty one every step otherwise

    @property
    def max_points(self) -> int:
        return self.scales.max_points

    @property
    def scale_history(self) -> list[tuple[int, float]]:
        """The kept points (``history()`` adds the latest step when it fell between them)."""
        return self.scales.kept

    def history(self) -> list[tuple[int, float]]:
        """The kept points, ending with the latest step seen."""
        return self.scales.points()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plugin = _plugin(trainer)
        if plugin is None:
            return
        plugin.core.scales.resize(self.max_points)
        self.scales = plugin.core.scales
        self._steps_seen = plugin.optimizer_steps  # a resumed run has taken these already

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        plugin = _plugin(trainer)
        if plugin is None:
            return
        step = plugin.optimizer_steps
        if step == self._steps_seen:
            return  # no optimizer step happened (gradient accumulation)
        self._steps_seen = step
        if trainer.loggers and step % max(trainer.log_every_n_steps, 1) == 0:
            _log(trainer, run_metrics(plugin))


class OverflowDiagnostics(pl.Callback):
    """Logs per-module headroom and underflow after each sampled step. (The warning for each new place a step
    went non-finite comes from the plugin itself, with or without this callback.)

    Args:
        top_k: how many modules (least headroom first) to log each time; the report keeps all of them.
    """

    def __init__(self, top_k: int = 10) -> None:
        self.top_k = top_k
        self._samples_seen = 0
        skip_inherited_batch_hooks(self)  # Lightning calls each empty one every step otherwise

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        plugin = _plugin(trainer)
        if plugin is None:
            return
        samples = plugin.statistics.samples_taken
        if samples == self._samples_seen:
            return
        self._samples_seen = samples
        if not trainer.loggers:
            return  # nothing to log to: do not build the figures
        metrics = sampled_metrics(plugin, self.top_k)
        if metrics:
            _log(trainer, metrics)


class PrecisionReport(pl.Callback):
    """At the end of fit, writes ``precision_report.{json,md,png}`` into the log dir and prints a summary.

    Args:
        dirpath: where to write; ``None`` uses ``trainer.log_dir`` (or ``default_root_dir`` without a logger).
        console: print the rich summary table.
    """

    def __init__(self, dirpath: str | None = None, console: bool = True) -> None:
        self.dirpath = dirpath
        self.console = console
        self.paths: dict[str, Any] = {}
        self.report: dict[str, Any] | None = None
        skip_inherited_batch_hooks(self)  # Lightning calls each empty one every step otherwise

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plugin = _plugin(trainer)
        if plugin is None:
            return
        self.report = build_report(plugin, plugin.scale_history)
        # trainer.log_dir is a collective under DDP (a broadcast): every rank asks, only rank zero writes.
        self._write(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _write(self, directory: str) -> None:
        self.paths = write_report(self.report, directory)
        if self.console:
            from rich.console import Console

            Console().print(render_table(self.report))
        rank_zero_info(f"lightning-mp: precision report written to {self.paths['markdown']}")


def attach_default_callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    """Give a Trainer that only has AdaptiveMP the monitor, the diagnostics and the report; returns those added.

    Strategies call the plugin's ``connect`` after the callbacks' ``setup`` but before ``on_fit_start``, so
    callbacks added then receive every hook they use. They go before the checkpoint callbacks (Lightning runs
    those last so that a checkpoint holds every other callback's state for the step just taken). A resumed
    run gives them back their state through the plugin's ``on_load_checkpoint``.
    """
    added: list[pl.Callback] = []
    for cls in (LossScaleMonitor, OverflowDiagnostics, PrecisionReport):
        if any(isinstance(cb, cls) for cb in trainer.callbacks):
            continue
        callback = cls()
        first_checkpoint = next(
            (i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)), len(trainer.callbacks)
        )
        trainer.callbacks.insert(first_checkpoint, callback)
        added.append(callback)
    return added
