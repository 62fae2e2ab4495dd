"""Small real torch models used as targets and sources in the tests (importable as `tests.helpers.models:...`)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv + batch norm + linear head: weights, biases, running stats and an int64 buffer."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


class TiedNet(nn.Module):
    """An embedding and an output projection that share one weight (tied weights)."""

    def __init__(self, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight


class Backbone(nn.Module):
    """TinyNet's layers under `backbone.` and the head as `head.fc`, like an MMPretrain classifier."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("conv", nn.Conv2d(3, channels, 3, padding=1))
        self.backbone.add_module("bn", nn.BatchNorm2d(channels))
        self.head = nn.Module()
        self.head.fc = nn.Linear(channels, classes)


def tiny_net(channels: int = 4, classes: int = 3) -> TinyNet:
    """Factory used as `tests.helpers.models:tiny_net`."""
    return TinyNet(channels, classes)


def backbone_net(channels: int = 4, classes: int = 3) -> Backbone:
    """Factory used as `tests.helpers.models:backbone_net`."""
    return Backbone(channels, classes)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and float buffer with seeded random values; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


def interrupting_factory() -> nn.Module:
    """A target factory that behaves as if the user pressed Ctrl-C while it ran."""
    raise KeyboardInterrupt
