"""Workloads shared by the benchmarks: the models and data of the issue's rows."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes, activation=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def classification(sizes, n, activation=nn.Tanh, seed=0):
    """A model with ``sizes`` and a batch of ``n`` random inputs with random class labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(sizes, activation)
    x = torch.randn(n, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return model, x, y


ROWS = {
    "mlp20": dict(sizes=(20, 64, 5), n=64),
    "mlp784": dict(sizes=(784, 32, 10), n=64),
}
