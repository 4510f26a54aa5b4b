"""Vision recipe: a small ResNet-style CNN with BatchNorm on procedurally drawn shapes or CIFAR-10."""

from lightning_mp.recipes.vision.data import VisionData, draw_shapes, load_cifar10
from lightning_mp.recipes.vision.model import SmallResNet

__all__ = ["SmallResNet", "VisionData", "draw_shapes", "load_cifar10"]
