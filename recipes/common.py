"""What every recipe shares: a classification LightningModule and a seeded train/val split helper."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler
from torchmetrics.classification import MulticlassAccuracy

from lightning_mp.errors import invalid
from lightning_mp.recipes.knobs import CLASSIFIER


class Classifier(L.LightningModule):
    """Cross-entropy classification of ``net(inputs)`` with accuracy from torchmetrics.

    Args:
        net: the network; called on the batch's inputs, returns logits.
        num_classes: number of classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up of the learning rate (a step-interval scheduler, so skipped steps show).
        lr_schedule: after the warm-up, ``"cosine"`` decays the rate to zero at the run's last optimizer step
            (Lightning's ``estimated_stepping_batches``); ``"constant"`` keeps it. The decay is what makes the
            last epoch's accuracy (what ``result.json`` and ``compare`` report) as good as the best epoch's:
            at a constant rate the final weights, and BatchNorm's running statistics with them, still move.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        lr_schedule: str = "cosine",
    ):
        CLASSIFIER.check(locals())  # what each argument accepts: recipes/knobs.py
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits.float(), target)
        self.train_acc(logits, target)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        logits = self(inputs)
        self.val_acc(logits, target)
        self.log("val/loss", F.cross_entropy(logits.float(), target), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # Read when the warm-up ends, not here: asking Lightning for the step count inside configure_optimizers
        # sets up the train loader before a resumed run restores its mid-epoch position (the batches differ).
        total = (lambda: self.trainer.estimated_stepping_batches) if self.hparams.lr_schedule == "cosine" else math.inf
        factor = lr_factor(warmup_steps=self.hparams.warmup_steps, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(warmup_steps: int, total_steps: float | Callable[[], float]) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step: linear warm-up over ``warmup_steps``, then a half cosine
    from 1 to 0 at ``total_steps`` (constant when it is infinite, as with ``max_epochs=-1``). A callable
    ``total_steps`` is asked once, when the warm-up ends."""
    warmup = max(warmup_steps, 1)
    known: list[float] = [] if callable(total_steps) else [total_steps]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not known:
            known.append(float(total_steps()))
        total = known[0]
        if not math.isfinite(total) or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TensorDataModule(L.LightningDataModule):
    """What every recipe's datamodule shares: the class-count check and seeded loaders over in-memory tensors.

    Subclasses implement ``load() -> (train, val, classes_found)`` with train/val as tuples of tensors.
    """

    num_classes: int
    batch_size: int
    seed: int

    def load(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        train, val, found = self.load()
        if found != self.num_classes:
            fix, problem = f"set data.num_classes={found}", f"but the data has {found} classes"
            raise invalid("data.num_classes", self.num_classes, fix, problem=problem)
        self.train_set, self.val_set = TensorDataset(*train), TensorDataset(*val)

    def train_dataloader(self) -> StatefulDataLoader:
        # Stateful loader and sampler: Lightning checkpoints where in the epoch the loader is, so a run resumed
        # from a mid-epoch checkpoint sees exactly the batches an uninterrupted run sees, in this epoch and
        # the next. The sampler owns its generator (the same order for every precision); the loader gets
        # another one for worker seeds, so neither consumes the other's random numbers (nor the global RNG).
        sampler = RandomSampler(self.train_set, generator=torch.Generator().manual_seed(self.seed))
        loader_generator = torch.Generator().manual_seed(self.seed + 1)
        return StatefulDataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, generator=loader_generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size * 2)


def check_root(root, field: str = "data.root"):
    """A real-data root must exist; say which field and what was given."""
    from pathlib import Path

    path = Path(root).expanduser()
    if not path.exists():
        allowed = "give an existing directory, or null for the built-in data"
        raise invalid(field, str(root), allowed, problem="does not exist")
    return path
