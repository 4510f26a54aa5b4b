"""A small ResNet-style CNN with BatchNorm."""

from __future__ import annotations

from torch import nn

from lightning_mp.recipes.vision.knobs import NET


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.skip(x)).relu()


class SmallResNet(nn.Module):
    """stem -> ``width`` blocks at full and half resolution -> global pooling -> linear."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3):
        NET.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(
            Block(width, width), Block(width, 2 * width, stride=2), Block(2 * width, 2 * width, stride=2)
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))
