"""Callbacks the ``lightning-mp`` command adds to every run (kept out of ``run.py`` so that checking a command
line does not import Lightning)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["SaveConfig", "StateBytes", "Throughput", "ValidationHistory"]


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


class StateBytes(L.Callback):
    """What training keeps in memory besides activations, in bytes, measured on the run's own tensors: the
    weights, the gradients (at the first optimizer step, where every gradient exists) and the optimizer state
    (at the end, once every state tensor was created)."""

    def __init__(self) -> None:
        self.weights = self.gradients = self.optimizer_state = 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if not self.gradients:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.gradients = sum(g.numel() * g.element_size() for g in grads)

    def on_train_end(self, trainer, module):
        self.weights = sum(p.numel() * p.element_size() for p in module.parameters())
        self.optimizer_state = sum(
            value.numel() * value.element_size()
            for optimizer in trainer.optimizers
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer_state": self.optimizer_state}
