"""A module's output Jacobian, as the products the backward sweep needs.

A rule describes the Jacobian ``J_n = d z_n / d x_n`` of its module's output with
respect to its input (per sample) by one of these classes. The sweep uses it
three ways: the loss gradient goes back as ``J_n^T g_n`` (:meth:`Jacobian.t_vector`),
explicit curvature columns as ``J_n^T B[k, n]`` (:meth:`Jacobian.t_columns`), and
every curvature term ``H_n`` as ``J_n^T H_n J_n`` (``pull_*``, one method per
term kind of :mod:`secorder.structured.curvature`).

Only :meth:`Jacobian.t_columns` is required: the ``pull_*`` defaults turn any
term into explicit columns and pull those, which is exact for every kind. A
Jacobian with more structure overrides the kinds it can keep cheaper (an
elementwise Jacobian keeps a diagonal term diagonal, a sample-independent matrix
turns one into a :class:`~secorder.structured.curvature.Shared` term, a max
pool's selection leaves columns :class:`~secorder.structured.curvature.Gathered`).

Example:
    >>> import torch
    >>> from secorder.structured.curvature import Curvature, Diagonal
    >>> jac = Elementwise(torch.tensor([[2., 3.]]), (1, 2))
    >>> Curvature([Diagonal(torch.ones(1, 2))]).pulled(jac).diagonal()
    tensor([[4., 9.]])
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
from torch import Tensor
from torch.func import vmap

from .curvature import Diagonal, Factor, Gathered, Shared, SoftmaxFactor, Term

__all__ = ["Jacobian", "Columns", "Elementwise", "Reshape", "Dense", "Gather", "Selection"]


class Jacobian:
    """Base class: subclasses implement :meth:`t_columns` and may override the ``pull_*`` methods."""

    def t_columns(self, B: Tensor) -> Tensor:
        """``J_n^T B[k, n]`` for columns ``B`` of shape ``[K, N, *out]``; returns ``[K, N, *in]``."""
        raise NotImplementedError

    def t_vector(self, g: Tensor) -> Tensor:
        """``J_n^T g_n`` for ``g`` of shape ``[N, *out]`` (the loss gradient going back)."""
        return self.t_columns(g.unsqueeze(0)).squeeze(0)

    def pull_factor(self, t: Factor) -> Term:
        return Factor(self.t_columns(t.B), t.w)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return self.pull_factor(t.as_factor())

    def pull_shared(self, t: Shared) -> Term:
        return self.pull_factor(t.as_factor())

    def pull_gathered(self, t: Gathered) -> Term:
        return self.pull_factor(t.as_factor())


class Columns(Jacobian):
    """Any Jacobian, given as the function ``B -> J^T B`` on columns ``[K, N, *out]``.

    :meth:`from_vjp` builds one from a ``torch.func.vjp`` pullback of the
    module's forward (exact for any module; the pullback is mapped over the
    columns with ``vmap``).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def t_columns(self, B: Tensor) -> Tensor:
        return self.fn(B)

    @classmethod
    def from_vjp(cls, vjp_fn: Callable[[Tensor], Tuple[Tensor, ...]]) -> "Columns":
        return cls(lambda B: vmap(lambda b: vjp_fn(b)[0])(B))


class Elementwise(Jacobian):
    """``J_n = diag(m_n)``: ``m`` broadcasts against the input (which has the output's shape)."""

    def __init__(self, m: Tensor, shape: Tuple[int, ...]):
        self.m, self.shape = m, tuple(shape)

    def t_columns(self, B: Tensor) -> Tensor:
        return B * self.m

    def t_vector(self, g: Tensor) -> Tensor:
        return g * self.m

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(t.d * (self.m * self.m))

    def pull_shared(self, t: Shared) -> Term:
        return Shared(t.B, t.r, self.m.expand(self.shape) if t.s is None else t.s * self.m)

    def pull_gathered(self, t: Gathered) -> Term:
        # diag(m) P^T B = P^T (gather(m) B): scale the short columns, stay gathered.
        N, C, Q = t.index.shape
        m = self.m.expand(self.shape).reshape(N, C, torch.Size(self.shape[2:]).numel())
        mg = torch.gather(m, 2, t.index).reshape(t.factor.B.shape[1:])
        return Gathered(Factor(t.factor.B * mg, t.factor.w), t.index, t.shape)

    # A Tokenwise term (secorder.structured.tokens, which builds on this module) pulls itself
    # through an Elementwise Jacobian: see Tokenwise.pulled.


class Reshape(Jacobian):
    """A per-sample reshape (``Flatten``, ``Identity``): the input has shape ``shape``."""

    def __init__(self, shape: Tuple[int, ...]):
        self.shape = tuple(shape)

    def t_columns(self, B: Tensor) -> Tensor:
        return B.reshape(tuple(B.shape[:2]) + self.shape[1:])

    def t_vector(self, g: Tensor) -> Tensor:
        return g.reshape(self.shape)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(t.d.reshape(self.shape))

    def pull_shared(self, t: Shared) -> Term:
        s = None if t.s is None else t.s.reshape(self.shape)
        return Shared(t.B.reshape(tuple(t.B.shape[:1]) + self.shape[1:]), t.r, s)

    def pull_gathered(self, t: Gathered) -> Term:
        return t if tuple(t.shape) == self.shape else self.pull_factor(t.as_factor())

    def pull_tokenwise(self, t: Term) -> Term:  # t: a secorder.structured.tokens.Tokenwise
        return t if tuple(t.shape) == self.shape else self.pull_factor(t.as_factor())


class Dense(Jacobian):
    """``J_n = W`` for every sample, on inputs ``[N, in]`` (a linear layer): ``W`` is ``[out, in]``."""

    def __init__(self, W: Tensor):
        self.W = W

    def t_columns(self, B: Tensor) -> Tensor:
        return B @ self.W

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Shared(self.W, t.d)

    def pull_shared(self, t: Shared) -> Term:
        if t.s is None:
            return Shared(t.B @ self.W, t.r)
        return Factor((t.B.unsqueeze(1) * t.s.unsqueeze(0)) @ self.W, t.r.transpose(0, 1))

    def pull_softmax(self, t: SoftmaxFactor) -> Term:
        # a (e_c - p)^T W = a (W[c] - p W): K N in, not K N C in.
        K = t.a.shape[0]
        rows = self.W[t.start:t.start + K]  # [K, in]
        return Factor(t.a.unsqueeze(2) * (rows.unsqueeze(1) - (t.p @ self.W).unsqueeze(0)), t.w)


class Gather(Jacobian):
    """A selection ``z[n, c, q] = x[n, c, index[n, c, q]]`` (max pooling); the input has shape ``shape``.

    ``index`` is ``[N, C, Q]`` into the flattened positions of each input
    channel. Its transpose scatters (adding up repeated indices); columns are
    left :class:`~secorder.structured.curvature.Gathered` until something needs
    them at full size, and a diagonal stays diagonal (a selection has at most
    one nonzero per row).
    """

    def __init__(self, index: Tensor, shape: Tuple[int, ...]):
        self.index, self.shape = index, tuple(shape)

    def _scatter(self, B: Tensor) -> Tensor:
        """``[..., N, C, *pooled]`` to ``[..., N, C, *pos]``, adding repeated positions."""
        N, C, Q = self.index.shape
        P = math.prod(self.shape[2:])
        front = tuple(B.shape[: B.dim() - len(self.shape)])
        idx = self.index.reshape((1,) * len(front) + (N, C, Q)).expand(front + (N, C, Q))
        flat = B.reshape(front + (N, C, Q))
        out = flat.new_zeros(front + (N, C, P)).scatter_add(len(front) + 2, idx, flat)
        return out.reshape(front + self.shape)

    def t_columns(self, B: Tensor) -> Tensor:
        return self._scatter(B)

    def t_vector(self, g: Tensor) -> Tensor:
        return self._scatter(g)

    def pull_factor(self, t: Factor) -> Term:
        return Gathered(t, self.index, self.shape)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(self._scatter(t.d))


class Selection(Jacobian):
    """An injective selection: each output entry copies a distinct input entry or is a constant.

    Zero or constant padding, cropping, slicing and permutations of a sample's
    entries. ``adjoint`` is the transpose on the trailing feature dims: it maps
    any ``[..., *out_feat]`` to ``[..., *in_feat]``, putting each entry back at
    the input position it was copied from and zeros elsewhere. As no two
    outputs read the same input, a diagonal term stays diagonal and shared rows
    stay shared (``diag(s) J = J diag(J^T s)``).

    Example:
        >>> import torch
        >>> from secorder.structured.curvature import Curvature, Diagonal
        >>> crop = Selection(lambda t: torch.nn.functional.pad(t, (-1, 0)))  # adjoint of a zero padding by 1 on the left
        >>> Curvature([Diagonal(torch.tensor([[1., 2., 3.]]))]).pulled(crop).diagonal()
        tensor([[2., 3.]])
    """

    def __init__(self, adjoint: Callable[[Tensor], Tensor]):
        self.adjoint = adjoint

    def t_columns(self, B: Tensor) -> Tensor:
        return self.adjoint(B)

    def t_vector(self, g: Tensor) -> Tensor:
        return self.adjoint(g)

    def pull_factor(self, t: Factor) -> Term:
        return Factor(self.adjoint(t.B), t.w)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(self.adjoint(t.d))

    def pull_shared(self, t: Shared) -> Term:
        return Shared(self.adjoint(t.B), t.r, None if t.s is None else self.adjoint(t.s))
