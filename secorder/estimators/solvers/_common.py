"""Shared plumbing of the solvers: column arithmetic, host decisions that work under ``vmap``, errors.

A solver advances ``k`` right-hand sides together (the rows of a ``(k, n)``
matrix): every iteration is one batched matvec, and every scalar of the
recurrence is a ``(k,)`` tensor. A column that has converged is frozen (its
updates are masked with ``torch.where``), so each column's iterates are exactly
those of its own solve. The loop stops when every column has converged; that test
is the one host decision per iteration. Under ``torch.func.vmap`` (right-hand sides
vmapped by the caller) the test is taken over the whole vmapped batch
(:func:`host_all` looks through functorch's wrappers), which is what a batched
solve does: the frozen columns make the results those of separate solves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = ["host_all", "host_any", "dot", "col_norm", "ConvergenceWarning", "IndefiniteOperatorError",
           "DivergenceError"]


class ConvergenceWarning(UserWarning):
    """A solve stopped at ``max_iterations`` (or at the working precision) without meeting ``tol``."""


class IndefiniteOperatorError(ValueError):
    """Conjugate gradients met a search direction of negative (or numerically zero) curvature."""


class DivergenceError(ValueError):
    """The Neumann series diverged (``scale`` too small, or an operator with negative eigenvalues)."""


def _unwrap(t: Tensor) -> Tensor:
    """``t`` as a plain tensor with every functorch level (vmap batch, grad tracking) peeled off."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def host_all(flag: Tensor) -> bool:
    """``bool(flag.all())``, over the whole vmapped batch when ``flag`` is batched by ``torch.func.vmap``.

    Example:
        >>> import torch
        >>> host_all(torch.tensor([True, False])), torch.func.vmap(lambda t: torch.tensor(host_all(t > 0)))(torch.ones(2))
        (False, tensor([True, True]))
    """
    return bool(_unwrap(flag).all())


def host_any(flag: Tensor) -> bool:
    """``bool(flag.any())``, over the whole vmapped batch (see :func:`host_all`).

    Example:
        >>> import torch
        >>> host_any(torch.tensor([True, False]))
        True
    """
    return bool(_unwrap(flag).any())


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per row of ``(k, n)`` matrices: ``<a_i, b_i>``, ``(k,)``.

    Example:
        >>> import torch
        >>> dot(torch.tensor([[1., 2.]]), torch.tensor([[3., 4.]]))
        tensor([11.])
    """
    return (a * b).sum(dim=1)


def col_norm(a: Tensor) -> Tensor:
    """Per row of a ``(k, n)`` matrix: the Euclidean norm, ``(k,)``.

    Example:
        >>> import torch
        >>> col_norm(torch.tensor([[3., 4.]]))
        tensor([5.])
    """
    return torch.linalg.vector_norm(a, dim=1)


def safe_div(num: Tensor, den: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """``num / den`` where ``den != 0`` (and ``where`` holds), zero elsewhere (no inf or nan).

    Example:
        >>> import torch
        >>> safe_div(torch.tensor([1., 1.]), torch.tensor([2., 0.]))
        tensor([0.5000, 0.0000])
    """
    ok = den != 0
    if where is not None:
        ok = ok & where
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
