"""Callbacks the ``lightning-mp`` command adds to every run (kept out of ``run.py`` so that checking a command
line does not import Lightning)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

__all__ = ["SaveConfig", "Throughput", "ValidationHistory"]


class SaveConfig(L.Callback):
    """Writes the whole composed config, resolved, to the run directory once training starts (after the data
    and the model were accepted: a refused command leaves an earlier run's ``config.yaml`` as it was)."""

    def __init__(self, cfg: DictConfig, path: Path) -> None:
        self.cfg, self.path = cfg, path

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            self.path.write_text(OmegaConf.to_yaml(self.cfg, resolve=True))


class Throughput(L.Callback):
    """Training samples per second and time per optimizer step, counting only time spent inside training
    batches."""

    def __init__(self) -> None:
        self.samples, self.seconds, self.batches = 0, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.samples += len(batch[0])
        self.batches += 1

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.seconds if self.seconds else None

    @property
    def ms_per_batch(self) -> float | None:
        return 1000 * self.seconds / self.batches if self.batches else None


class ValidationHistory(L.Callback):
    """Each validation's loss and accuracy with the epoch and optimizer step it ran at (the learning curves
    ``compare`` plots). The sanity check is not a validation of training."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        point = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for key, name in (("val/loss", "val_loss"), ("val/acc", "val_acc")):
            if key in metrics:
                point[name] = float(metrics[key])
        self.points.append(point)

    def state_dict(self):
        return {"points": self.points}  # a resumed run keeps the curve of the epochs before it

    def load_state_dict(self, state_dict):
        self.points = list(state_dict.get("points", []))
