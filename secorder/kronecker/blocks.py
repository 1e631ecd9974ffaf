"""The linear algebra of one Kronecker block ``L (x) R`` on a parameter's 2-D view, in two forms.

A parameter leaf is viewed as a ``rows x cols`` matrix ``V`` (a weight
``[d_out, d_in, *kernel]`` as ``d_out x (d_in * prod kernel)``, a bias as a column);
its block of the curvature acts as ``V -> L V R`` (``L (x) R`` on the row-major
flattening). A factor is a dense symmetric matrix, a vector (a diagonal matrix:
an Embedding's token counts) or ``None`` (the ``1 x 1`` identity: a bias's right
factor). Two forms:

* :class:`KronBlock`: the factors themselves (K-FAC). Products, diagonal and trace
  come from them directly; the eigendecomposition is made once, when first
  needed (solves, log-determinants, eigenvalues), and cached;
* :class:`EigenBlock`: ``(Q_L (x) Q_R) diag(vec S) (Q_L (x) Q_R)^T`` with orthogonal
  ``Q_L``, ``Q_R`` (``None``: the identity) and eigenvalues ``S`` shaped like ``V``:
  EK-FAC's corrected eigenvalues (George et al. 2018), and every damped inverse
  ``S -> 1 / (S + damping)``.

Every operation takes a leading batch of probes (``V`` of shape ``[..., rows, cols]``).

Example:
    >>> import torch
    >>> L, R = torch.tensor([[2., 1.], [1., 2.]]), torch.tensor([[1., 0.], [0., 3.]])
    >>> block = KronBlock(L, R)
    >>> V = torch.randn(2, 2)
    >>> torch.allclose(block.apply(V).reshape(-1), torch.kron(L, R) @ V.reshape(-1))
    True
    >>> torch.allclose(block.eigen().apply(V), block.apply(V), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["KronBlock", "EigenBlock", "factor_dense", "factor_eigh"]


def _left(M: Optional[Tensor], V: Tensor) -> Tensor:
    """``M V`` for a factor ``M`` (dense, diagonal vector or ``None``)."""
    if M is None:
        return V
    if M.dim() == 1:
        return M.unsqueeze(-1) * V
    return M @ V


def _right(V: Tensor, M: Optional[Tensor]) -> Tensor:
    """``V M`` for a symmetric factor ``M``."""
    if M is None:
        return V
    if M.dim() == 1:
        return V * M
    return V @ M


def _diag(M: Optional[Tensor], like: Tensor) -> Tensor:
    if M is None:
        return torch.ones(1, dtype=like.dtype, device=like.device)
    return M if M.dim() == 1 else M.diagonal()


def factor_dense(M: Optional[Tensor], like: Tensor) -> Tensor:
    """The factor as a dense matrix.

    Example:
        >>> factor_dense(torch.tensor([1., 2.]), torch.zeros(1))
        tensor([[1., 0.],
                [0., 2.]])
    """
    if M is None:
        return torch.ones(1, 1, dtype=like.dtype, device=like.device)
    return torch.diag(M) if M.dim() == 1 else M


def factor_eigh(M: Optional[Tensor], like: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Eigenvalues (clamped at 0: the factors are Gram matrices) and eigenvectors (``None``: identity).

    Example:
        >>> w, Q = factor_eigh(torch.tensor([3., 1.]), torch.zeros(1))
        >>> w, Q
        (tensor([3., 1.]), None)
    """
    if M is None:
        return torch.ones(1, dtype=like.dtype, device=like.device), None
    if M.dim() == 1:
        return M.clamp_min(0), None
    w, Q = torch.linalg.eigh(M)
    return w.clamp_min(0), Q


def _square(Q: Optional[Tensor]) -> Optional[Tensor]:
    return None if Q is None else Q * Q


class EigenBlock:
    """``(Q_L (x) Q_R) diag(vec S) (Q_L (x) Q_R)^T`` (module docstring).

    Args:
        QL: orthogonal ``rows x rows`` (``None``: identity).
        QR: orthogonal ``cols x cols`` (``None``: identity).
        S: the eigenvalues, ``rows x cols``.
    """

    def __init__(self, QL: Optional[Tensor], QR: Optional[Tensor], S: Tensor):
        self.QL, self.QR, self.S = QL, QR, S

    def tensors(self) -> List[Optional[Tensor]]:
        return [self.QL, self.QR, self.S]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(rows, cols)`` of the parameter's 2-D view."""
        return tuple(self.S.shape)

    def rotate(self, V: Tensor) -> Tensor:
        """``Q_L^T V Q_R``."""
        W = V if self.QL is None else self.QL.mT @ V
        return W if self.QR is None else W @ self.QR

    def unrotate(self, W: Tensor) -> Tensor:
        """``Q_L W Q_R^T``."""
        V = W if self.QL is None else self.QL @ W
        return V if self.QR is None else V @ self.QR.mT

    def apply(self, V: Tensor, S: Optional[Tensor] = None) -> Tensor:
        return self.unrotate(self.rotate(V) * (self.S if S is None else S))

    def eigenvalues(self) -> Tensor:
        return self.S

    def eigen(self) -> "EigenBlock":
        return self

    def diagonal(self) -> Tensor:
        D = self.S
        QL2, QR2 = _square(self.QL), _square(self.QR)
        if QL2 is not None:
            D = QL2 @ D
        if QR2 is not None:
            D = D @ QR2.mT
        return D

    def trace(self) -> Tensor:
        return self.S.sum()

    def dense(self) -> Tensor:
        rows, cols = self.S.shape
        QL = self.QL if self.QL is not None else torch.eye(rows, dtype=self.S.dtype, device=self.S.device)
        QR = self.QR if self.QR is not None else torch.eye(cols, dtype=self.S.dtype, device=self.S.device)
        Q = torch.kron(QL.contiguous(), QR.contiguous())  # kron views its inputs: eigh gives column-major
        return (Q * self.S.reshape(-1)) @ Q.mT

    def inverse(self, damping: float) -> "EigenBlock":
        return EigenBlock(self.QL, self.QR, 1.0 / (self.S + damping))


class KronBlock:
    """``L (x) R`` from its factors, eigendecomposed once when first needed (module docstring).

    Args:
        L: ``rows x rows`` (dense or a diagonal vector).
        R: ``cols x cols`` (dense, a diagonal vector, or ``None`` for a bias's ``1 x 1`` identity).
    """

    def __init__(self, L: Tensor, R: Optional[Tensor], cache: Optional[dict] = None):
        self.L, self.R = L, R
        self._cache = cache if cache is not None else {}

    def tensors(self) -> List[Optional[Tensor]]:
        return [self.L, self.R]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(rows, cols)`` of the parameter's 2-D view."""
        return self.L.shape[0], 1 if self.R is None else self.R.shape[0]

    def apply(self, V: Tensor) -> Tensor:
        return _right(_left(self.L, V), self.R)

    def _eigh(self, which: str) -> Tuple[Tensor, Optional[Tensor]]:
        M = self.L if which == "L" else self.R
        key = id(M)  # a layer's G is the left factor of its weight and its bias: one decomposition
        found = self._cache.get(key)
        if found is None or found[0] is not M:
            found = (M, factor_eigh(M, self.L))
            self._cache[key] = found
        return found[1]

    def eigen(self) -> EigenBlock:
        wL, QL = self._eigh("L")
        wR, QR = self._eigh("R")
        return EigenBlock(QL, QR, torch.outer(wL, wR))

    def eigenvalues(self) -> Tensor:
        return self.eigen().S

    def diagonal(self) -> Tensor:
        return torch.outer(_diag(self.L, self.L), _diag(self.R, self.L))

    def trace(self) -> Tensor:
        return _diag(self.L, self.L).sum() * _diag(self.R, self.L).sum()

    def dense(self) -> Tensor:
        return torch.kron(factor_dense(self.L, self.L).contiguous(), factor_dense(self.R, self.L).contiguous())

    def inverse(self, damping: float) -> EigenBlock:
        return self.eigen().inverse(damping)
