"""``Residual(body)``: the skip connection ``x + body(x)``, and ``Parallel`` branches, as modules the engine understands.

BackPACK's ``DiagHessian`` refuses residual blocks. Here the curvature at the
block input is ``(I + J)^T H_z (I + J)`` plus the residual terms raised inside
the body, with ``J`` the body's Jacobian: the output curvature's columns are
pulled back through the body and the skip path is added column by column
(:mod:`secorder.structured.backprop`). ``Parallel(f_1, ..., f_m)`` sums (or
concatenates) its branches the same way: the columns go through every branch
and add up (:mod:`secorder.structured.rules.parallel`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Residual", "Parallel"]


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


class Parallel(nn.Module):
    """Branches applied to the same input, their outputs summed or concatenated.

    ``Parallel(f, g)(x) = f(x) + g(x)`` (``merge="sum"``; every branch keeps one
    output shape) or ``torch.cat([f(x), g(x)], dim)`` (``merge="concat"``). The
    branches are children ``"0"``, ``"1"``, ... (their parameters are named
    ``"0.weight"``, ...). ``Residual(body)`` is ``Parallel(nn.Identity(), body)``.

    Args:
        *branches: the modules, at least one.
        merge: ``"sum"`` or ``"concat"``.
        dim: the concatenation dimension (counted with the batch; not 0).

    Example:
        >>> import torch
        >>> block = Parallel(torch.nn.Linear(3, 2), torch.nn.Linear(3, 4), merge="concat")
        >>> block(torch.zeros(5, 3)).shape
        torch.Size([5, 6])
    """

    def __init__(self, *branches: nn.Module, merge: str = "sum", dim: int = 1):
        super().__init__()
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        for i, b in enumerate(branches):
            if not isinstance(b, nn.Module):
                raise TypeError(f"branches[{i}] must be an nn.Module, got {type(b).__name__}")
            self.add_module(str(i), b)
        if not isinstance(merge, str):
            raise TypeError(f"merge must be a str ('sum' or 'concat'), got {type(merge).__name__}")
        if merge not in ("sum", "concat"):
            raise ValueError(f"merge must be 'sum' or 'concat', got {merge!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim == 0:
            raise ValueError("dim must not be the batch dimension 0")
        self.merge, self.dim = merge, dim

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.children()]
        if self.merge == "concat":
            return torch.cat(outs, self.dim)
        out = outs[0]
        for o in outs[1:]:
            out = out + o
        return out

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}, dim={self.dim}" if self.merge == "concat" else "merge='sum'"
