"""Images for the vision recipe: procedurally drawn shapes (default, no download) or CIFAR-10 from disk."""

from __future__ import annotations

import math
import pickle

import torch

from lightning_mp.errors import ConfigError, invalid
from lightning_mp.recipes.common import TensorDataModule, check_root
from lightning_mp.recipes.vision.knobs import DATA

# Twelve shapes in six confusable pairs: each pair differs only by a turn, a mirror, a hole or an aspect.
SHAPES = (
    "circle",
    "ring",
    "square",
    "diamond",
    "triangle up",
    "triangle down",
    "plus",
    "x",
    "wide ellipse",
    "tall ellipse",
    "hollow square",
    "half disc",
)


def draw_shapes(
    count: int, seed: int, size: int = 32, noise: float = 0.3, max_turn: float = 20.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` RGB images of one of twelve shapes: random position, size (radius 4-11 px), colour, a turn of up
    to ``max_turn`` degrees, and pixel noise of standard deviation ``noise``. Deterministic for a seed.

    The class is the shape, never the colour or position, and every image's label is exact: the pairs (square
    and diamond, plus and x, ...) differ by 45 or 90 degrees, more than any turn, so a model has to see form at
    a few pixels' size through the noise. That is what keeps the task unsolved in a few epochs (fp32 ends in the
    0.80-0.95 band at the defaults) while its ceiling stays at 1.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (count,), generator=gen)
    r = 4 + torch.rand(count, 1, 1, generator=gen) * 7  # radius 4..11 px
    cx = r + torch.rand(count, 1, 1, generator=gen) * (size - 2 * r)
    cy = r + torch.rand(count, 1, 1, generator=gen) * (size - 2 * r)
    turn = (2 * torch.rand(count, 1, 1, generator=gen) - 1) * math.radians(max_turn)
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    dx, dy = x - cx, y - cy
    u, v = dx * turn.cos() + dy * turn.sin(), dy * turn.cos() - dx * turn.sin()  # the shape's own frame
    p, q = (u + v) / math.sqrt(2), (v - u) / math.sqrt(2)  # that frame turned 45 degrees
    dist, bar = (u**2 + v**2).sqrt(), r / 3.5
    square = (u.abs() < r * 0.85) & (v.abs() < r * 0.85)
    masks = torch.stack(
        [
            dist < r,
            (dist < r) & (dist > r * 0.55),
            square,
            u.abs() + v.abs() < r,
            (v < r * 0.8) & (v > -r) & (u.abs() < (v + r) / 2),
            (v > -r * 0.8) & (v < r) & (u.abs() < (r - v) / 2),
            ((u.abs() < bar) & (v.abs() < r)) | ((v.abs() < bar) & (u.abs() < r)),
            ((p.abs() < bar) & (q.abs() < r)) | ((q.abs() < bar) & (p.abs() < r)),
            (u / r) ** 2 + (v / (0.55 * r)) ** 2 < 1,
            (u / (0.55 * r)) ** 2 + (v / r) ** 2 < 1,
            square & ~((u.abs() < r * 0.45) & (v.abs() < r * 0.45)),
            (dist < r) & (v < 0),
        ]
    )  # (shape, count, H, W)
    mask = masks[labels, torch.arange(count)].float()
    colour = 0.4 + 0.6 * torch.rand(count, 3, 1, 1, generator=gen)
    background = 0.3 * torch.rand(count, 3, 1, 1, generator=gen)
    pixels = noise * torch.randn(count, 3, size, size, generator=gen)
    images = background + mask[:, None] * (colour - background) + pixels
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
        num_classes: 12 for shapes, 10 for CIFAR-10 (checked against the data).
        batch_size: per step.
        train_size: drawn training images (shapes only).
        val_size: drawn validation images (shapes only).
        seed: data seed.
    """

    def __init__(
        self,
        root=None,
        num_classes: int = 12,
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
