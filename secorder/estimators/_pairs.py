"""Vectors indexed by a pair of test vectors ``(i, j)``, for leave-two-out algebra in ``m x m`` space.

The jackknife of XTrace needs, for every pair ``i != j``, the estimator whose basis
drops test vectors ``i`` and ``j`` and whose residual is probed by ``omega_j``. Its
ingredients are vectors such as ``c_ij = (I - s_i s_i^T - p_ij p_ij^T) W_j``: each is a
combination, with ``(m, m)`` coefficient arrays, of *columns* ``i`` or ``j`` of a few
``m x m`` matrices (``W``, ``S``, ``H S``, ...). A :class:`PairVec` keeps that form, so
a bilinear form ``u_ij^T X v_ij`` for all pairs at once is a sum of entries of the
``m x m`` products ``F^T X F'``: ``O(m^3)`` per term instead of ``O(m^4)`` for the
``m^2`` explicit vectors. ``X`` may carry leading (leaf) dimensions.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

# (coefficient broadcastable to (..., m, m) over (i, j), matrix whose columns are the vectors, "i" or "j")
_Term = Tuple[Tensor, Tensor, str]


class PairVec:
    """``v_ij = sum_k coef_k[i, j] * F_k[:, i or j]``."""

    def __init__(self, terms: List[_Term]):
        self.terms = terms

    @staticmethod
    def column(F: Tensor, side: str) -> "PairVec":
        """``v_ij = F[:, i]`` (``side="i"``) or ``F[:, j]``."""
        return PairVec([(torch.ones((), dtype=F.dtype, device=F.device), F, side)])

    def __add__(self, other: "PairVec") -> "PairVec":
        return PairVec(self.terms + other.terms)

    def __sub__(self, other: "PairVec") -> "PairVec":
        return self + other.scale(-1.0)

    def scale(self, coef) -> "PairVec":
        """``coef[i, j] * v_ij``."""
        return PairVec([(c * coef, F, s) for c, F, s in self.terms])

    def apply(self, X: Tensor) -> "PairVec":
        """``X v_ij`` for an ``m x m`` matrix ``X``."""
        return PairVec([(c, X @ F, s) for c, F, s in self.terms])


def _pick(P: Tensor, su: str, sv: str) -> Tensor:
    """Entry ``(i or j, i or j)`` of ``P`` as an ``(m, m)`` array over pairs ``(i, j)``."""
    if su == "i" and sv == "j":
        return P
    if su == "j" and sv == "i":
        return P.transpose(-1, -2)
    d = P.diagonal(dim1=-2, dim2=-1)
    return d.unsqueeze(-1) if su == "i" else d.unsqueeze(-2)


def bilinear(u: PairVec, X: Optional[Tensor], v: PairVec) -> Tensor:
    """``u_ij^T X v_ij`` (``X = None``: the identity) for all pairs: ``(..., m, m)``."""
    total = None
    for cu, Fu, su in u.terms:
        left = Fu.transpose(-1, -2) if X is None else Fu.transpose(-1, -2) @ X
        for cv, Fv, sv in v.terms:
            term = cu * cv * _pick(left @ Fv, su, sv)
            total = term if total is None else total + term
    return total


def deflate(v: PairVec, basis: List[PairVec]) -> PairVec:
    """``(I - sum_b b b^T) v`` for orthonormal pair vectors ``basis``."""
    out = v
    for b in basis:
        out = out - b.scale(bilinear(b, None, v))
    return out
