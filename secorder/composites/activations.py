"""Activations without a double backward or a batching rule, as compositions of ``clamp`` and ``leaky_relu``.

* ``hardsigmoid`` (MobileNetV3's squeeze-excitation gate) has no derivative of
  its backward: every second-order call on a model with ``nn.Hardsigmoid``
  stopped with ``derivative for aten::hardsigmoid_backward is not implemented``.
  It is ``clamp(x + 3, 0, 6) / 6``.
* ``rrelu`` in evaluation mode is ``leaky_relu`` with slope ``(lower + upper) / 2``,
  but PyTorch runs its random kernel, which ``vmap`` (every batched product) refuses.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    >>> torch.equal(hardsigmoid(x), F.hardsigmoid(x)), torch.allclose(rrelu(x), F.rrelu(x))
    (True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["hardsigmoid", "rrelu"]


def _not_inplace(input: Tensor, inplace: bool = False) -> bool:
    return not inplace


@register(F.hardsigmoid, applies=_not_inplace,
          why="no double backward (derivative for aten::hardsigmoid_backward is not implemented)")
def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` as ``clamp(x + 3, 0, 6) / 6`` (out of place)."""
    return torch.clamp(input + 3.0, 0.0, 6.0) / 6.0


def _rrelu_eval(input: Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
                inplace: bool = False) -> bool:
    return not training and not inplace


@register(F.rrelu, applies=_rrelu_eval,
          why="evaluation mode runs the random kernel, which vmap refuses (aten::rrelu_with_noise)")
def rrelu(input: Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> Tensor:
    """``F.rrelu`` in evaluation mode: ``leaky_relu`` with the mean slope."""
    return F.leaky_relu(input, (lower + upper) / 2)
