"""Callbacks the ``lightning-mp`` command adds to every run (kept out of ``run.py`` so that checking a command
line does not import Lightning)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

__all__ = ["SaveConfig", "Throughput"]


class SaveConfig(L.Callback):
    """Writes the whole composed config, resolved, to the run directory once training starts (after the data
    and the model were accepted: a refused command leaves an earlier run's ``config.yaml`` as it was)."""

    def __init__(self, cfg: DictConfig, path: Path) -> None:
        self.cfg, self.path = cfg, path

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            self.path.write_text(OmegaConf.to_yaml(self.cfg, resolve=True))


class Throughput(L.Callback):
    """Training samples per second, counting only time spent inside training batches."""

    def __init__(self) -> None:
        self.samples, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.samples += len(batch[0])

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.seconds if self.seconds else None
