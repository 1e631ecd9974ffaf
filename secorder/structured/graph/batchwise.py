"""Curvature across samples: what an operation that couples the samples (batch statistics) leaves behind.

Everywhere else the curvature at a value ``[N, *feat]`` is block diagonal over
the samples (:mod:`secorder.structured.curvature`). A training-mode batch norm
normalises with the statistics of the whole batch, so the output of every sample
depends on the input of every other one: the curvature at its input is a full
``N x N`` block matrix. :class:`Batchwise` keeps it as explicit whole-batch
columns ``B[m]`` (each of shape ``[N, *feat]``) with weights ``w[m]``:
``sum_m w_m vec(B[m]) vec(B[m])^T``.

* A per-sample term becomes batchwise (:func:`to_batchwise`) by giving each of its
  per-sample columns ``b_kn`` its own whole-batch column ``e_n (x) b_kn``
  (``K N`` columns, zero outside sample ``n``).
* A per-sample Jacobian pulls whole-batch columns back sample by sample, exactly as
  it pulls per-sample columns (:meth:`Batchwise.pulled` uses ``t_columns``); a
  coupling operation's :class:`BatchJacobian` is its whole-batch ``vjp`` mapped over
  the columns.
* A parameter's diagonal from whole-batch columns is ``sum_m w_m (J_theta^T B[m])^2``
  with the whole-batch parameter Jacobian (one ``vjp`` per column, mapped):
  :func:`batch_parameter_diagonal`.

Example:
    >>> import torch
    >>> from secorder.structured.curvature import Factor
    >>> t = to_batchwise(Factor(torch.ones(1, 2, 3)))
    >>> t.B.shape, t.B[1, 0].sum().item(), t.B[1, 1].sum().item()
    (torch.Size([2, 2, 3]), 0.0, 3.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.func import vmap

from ..curvature import Diagonal, Factor, Term
from ..errors import Unsupported
from ..jacobians import Jacobian

__all__ = ["Batchwise", "BatchJacobian", "to_batchwise", "add_batchwise", "batch_parameter_diagonal"]


@dataclass
class Batchwise(Term):
    """``sum_m w[m] vec(B[m]) vec(B[m])^T`` over the whole batch; ``B``: ``[M, N, *feat]``, ``w``: ``[M]`` or None."""

    B: Tensor
    w: Optional[Tensor] = None

    def diagonal(self) -> Tensor:
        raise Unsupported("a curvature across samples has no per-sample diagonal (a module rule read it)")

    def as_factor(self) -> Factor:
        raise Unsupported("a curvature across samples has no per-sample columns")

    def pulled(self, jac: Jacobian) -> Term:
        if isinstance(jac, BatchJacobian):
            return Batchwise(jac.fn(self.B), self.w)
        return Batchwise(jac.t_columns(self.B), self.w)


def to_batchwise(term: Term) -> Batchwise:
    """A per-sample term as whole-batch columns (see the module docstring); a batchwise one unchanged."""
    if isinstance(term, Batchwise):
        return term
    f = term.as_factor()
    B, w = f.B, f.w
    K, N = B.shape[:2]
    eye = torch.eye(N, dtype=B.dtype, device=B.device).reshape((1, N, N) + (1,) * (B.dim() - 2))
    cols = (B.unsqueeze(2) * eye).reshape((K * N, N) + tuple(B.shape[2:]))  # column (k, n) = e_n (x) B[k, n]
    return Batchwise(cols, None if w is None else w.reshape(K * N))


def add_batchwise(a: Term, b: Term) -> Batchwise:
    """Two pull-backs of the same columns, added column by column (either side may still be per sample)."""
    ba, bb = to_batchwise(a), to_batchwise(b)
    return Batchwise(ba.B + bb.B, bb.w)


class BatchJacobian(Jacobian):
    """The Jacobian of an operation that couples the samples: its whole-batch ``vjp``, mapped over columns."""

    def __init__(self, pullback: Callable[[Tensor], Tuple[Tensor, ...]]):
        self.pullback = pullback

    def fn(self, B: Tensor) -> Tensor:
        return vmap(lambda b: self.pullback(b)[0])(B)

    def t_columns(self, B: Tensor) -> Tensor:  # pragma: no cover (terms go through pull_*)
        return self.fn(B)

    def t_vector(self, g: Tensor) -> Tensor:
        return self.pullback(g)[0]

    def pull_factor(self, t: Factor) -> Term:
        return to_batchwise(t).pulled(self)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return to_batchwise(t).pulled(self)

    def pull_shared(self, t: Term) -> Term:
        return to_batchwise(t).pulled(self)

    def pull_gathered(self, t: Term) -> Term:
        return to_batchwise(t).pulled(self)

    def pull_tokenwise(self, t: Term) -> Term:
        return to_batchwise(t).pulled(self)


def batch_parameter_diagonal(pullback: Callable[[Tensor], Tuple[Tensor, ...]], term: Batchwise) -> Tensor:
    """``sum_m w_m (J_theta^T B[m])**2`` given the whole-batch ``vjp`` of the output with respect to ``theta``."""
    G = vmap(lambda b: pullback(b)[0])(term.B)
    sq = G * G
    if term.w is not None:
        sq = sq * term.w.reshape((-1,) + (1,) * (sq.dim() - 1))
    return sq.sum(0)
