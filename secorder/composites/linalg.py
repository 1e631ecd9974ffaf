"""``det`` from an LU factorisation: PyTorch's third derivative of ``det`` is ``nan``.

``torch.linalg.det`` has correct first and second derivatives, but differentiating
its double backward gives ``nan`` even for well-conditioned matrices (the
gradient of a Hessian penalty through a determinant: normalising flows, Gaussian
likelihoods). ``det(A) = sign(P) prod(diag(U))`` from ``torch.linalg.lu_factor``,
whose derivatives of every order are right, gives the same value. Its forward mode
stays unsafe (:mod:`secorder.composites.forward_mode`): ``so.hvp`` takes
reverse-over-reverse through it.

Example:
    >>> import torch
    >>> a = torch.randn(3, 4, 4, dtype=torch.float64)
    >>> torch.allclose(det(a), torch.linalg.det(a))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import forward_mode
from .registry import register

__all__ = ["det"]


def _square(A: Tensor, *args: object, **kwargs: object) -> bool:
    return isinstance(A, Tensor) and A.dim() >= 2 and A.shape[-1] == A.shape[-2] and A.shape[-1] > 0 \
        and (A.is_floating_point() or A.is_complex()) and not args and not kwargs


@register(torch.linalg.det, torch.det, torch.Tensor.det, applies=_square,
          why="third derivatives are nan (the double backward is not differentiable)")
def det(A: Tensor) -> Tensor:
    """``torch.linalg.det`` as ``sign(P) prod(diag(U))`` of ``torch.linalg.lu_factor``."""
    forward_mode.check(torch.linalg.det, (A,), {})
    LU, pivots = torch.linalg.lu_factor(A)
    n = A.shape[-1]
    swaps = (pivots != torch.arange(1, n + 1, dtype=pivots.dtype, device=pivots.device)).sum(-1)
    sign = (1 - 2 * (swaps % 2)).to(LU.dtype)
    return sign * LU.diagonal(dim1=-2, dim2=-1).prod(-1)
