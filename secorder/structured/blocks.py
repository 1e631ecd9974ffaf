"""``Residual(body)``: the skip connection ``x + body(x)`` as a module the engine understands.

BackPACK's ``DiagHessian`` refuses residual blocks. Here the curvature at the
block input is ``(I + J)^T H_z (I + J)`` plus the residual terms raised inside
the body, with ``J`` the body's Jacobian: the output curvature's columns are
pulled back through the body and the skip path is added column by column
(:mod:`secorder.structured.backprop`).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``Residual(body)(x) = x + body(x)``; ``body`` must keep the shape of ``x``.

    Example:
        >>> import torch
        >>> block = Residual(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()))
        >>> block(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)
