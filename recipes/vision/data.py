"""Images for the vision recipe: procedurally drawn shapes (default, no download) or CIFAR-10 from disk."""

from __future__ import annotations

import pickle

import torch

from lightning_mp.errors import ConfigError, invalid
from lightning_mp.recipes.common import TensorDataModule, check_root
from lightning_mp.recipes.vision.knobs import DATA

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def draw_shapes(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` RGB images of one of six shapes, random position, size, colour and background noise.

    Deterministic for a seed. The class is the shape, never the colour or position, so a model has to see form.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (count,), generator=gen)
    r = 4 + torch.rand(count, 1, 1, generator=gen) * 7  # radius 4..11 px
    cx = r + torch.rand(count, 1, 1, generator=gen) * (size - 2 * r)
    cy = r + torch.rand(count, 1, 1, generator=gen) * (size - 2 * r)
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    dx, dy = x - cx, y - cy
    dist = (dx**2 + dy**2).sqrt()
    masks = torch.stack(
        [
            dist < r,
            (dx.abs() < r * 0.85) & (dy.abs() < r * 0.85),
            (dy < r * 0.8) & (dy > -r) & (dx.abs() < (dy + r) / 2),
            ((dx.abs() < r / 3.5) & (dy.abs() < r)) | ((dy.abs() < r / 3.5) & (dx.abs() < r)),
            (dist < r) & (dist > r * 0.55),
            dx.abs() + dy.abs() < r,
        ]
    )  # (shape, count, H, W)
    mask = masks[labels, torch.arange(count)].float()
    colour = 0.4 + 0.6 * torch.rand(count, 3, 1, 1, generator=gen)
    background = 0.3 * torch.rand(count, 3, 1, 1, generator=gen)
    noise = 0.15 * torch.randn(count, 3, size, size, generator=gen)
    images = background + mask[:, None] * (colour - background) + noise
    return (images - 0.35) / 0.3, labels


# What a CIFAR-10 "python version" batch is made of: a dict of bytes keys, lists, and NumPy arrays. NumPy's
# arrays are rebuilt through these functions and classes; any other global in a file is refused, because
# unpickling calls whatever a file names (a crafted data_batch_1 would run code).
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only the types a CIFAR-10 batch uses (see ``_CIFAR_GLOBALS``)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def load_cifar10(root) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The CIFAR-10 "python version" batches (data_batch_1..5, test_batch) under ``root`` (or
    ``root/cifar-10-batches-py``), normalised per channel. Returns (train, test) as (images, labels)."""
    path = check_root(root)
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"

    def read(names):
        images, labels = [], []
        for name in names:
            file = path / name
            if not file.exists():
                expected = "expected data_batch_1..5 and test_batch"
                raise invalid("data.root", str(root), expected, problem=f"has no CIFAR-10 batch {name!r}")
            try:
                with open(file, "rb") as f:
                    batch = _CifarUnpickler(f, encoding="bytes").load()
                data, target = batch[b"data"], batch[b"labels"]
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as error:
                raise ConfigError(f"{file} is not a CIFAR-10 python batch ({error}).") from error
            images.append(torch.as_tensor(data, dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.append(torch.as_tensor(target, dtype=torch.long))
        return torch.cat(images).float() / 255.0, torch.cat(labels)

    train = read([f"data_batch_{i}" for i in range(1, 6) if (path / f"data_batch_{i}").exists()] or ["data_batch_1"])
    test = read(["test_batch"])
    mean = train[0].mean(dim=(0, 2, 3), keepdim=True)
    std = train[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return ((train[0] - mean) / std, train[1]), ((test[0] - mean) / std, test[1])


class VisionData(TensorDataModule):
    """Shapes by default; CIFAR-10 python batches when ``root`` is given.

    Args:
        root: directory with the CIFAR-10 python batches, or ``None`` for the drawn shapes.
        num_classes: 6 for shapes, 10 for CIFAR-10 (checked against the data).
        batch_size: per step.
        train_size: drawn training images (shapes only).
        val_size: drawn validation images (shapes only).
        seed: data seed.
    """

    def __init__(
        self,
        root=None,
        num_classes: int = 6,
        batch_size: int = 64,
        train_size: int = 3000,
        val_size: int = 600,
        seed: int = 0,
    ):
        DATA.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.root, self.num_classes, self.batch_size = root, num_classes, batch_size
        self.train_size, self.val_size, self.seed = train_size, val_size, seed

    def load(self):
        if self.root is None:
            return draw_shapes(self.train_size, self.seed), draw_shapes(self.val_size, self.seed + 1), len(SHAPES)
        train, val = load_cifar10(self.root)
        return train, val, 10
