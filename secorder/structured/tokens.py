"""Curvature that is block diagonal over positions (tokens), and the Jacobians that keep it so.

A token-level loss (cross-entropy on ``[batch * tokens, vocab]`` logits after
``nn.Flatten(0, 1)``, or on ``[batch, vocab, tokens]`` logits) has a per-sequence
Hessian that is block diagonal over the tokens: one ``C x C`` block per token, ``C``
factor columns each. As explicit per-sequence columns (the
:class:`~secorder.structured.curvature.Factor` kind) that is ``C x T`` columns of
``T x C`` entries per sequence, ``T`` times more than the curvature holds. The
:class:`Tokenwise` term kind keeps it as it is: a term over the ``N * P`` rows of
the tensor (``P`` positions per sample, the position dimensions moved next to the
batch and flattened into it), so that every module that acts on each position on
its own (``Linear`` on ``[N, T, d]``, ``LayerNorm``, elementwise activations,
``Dropout`` in eval mode) pulls it back as if the positions were extra samples:
``C`` columns per token, at the cost of ``C`` gradient evaluations of the per-token
layers. A module that mixes positions (attention) turns it into explicit
per-sequence columns, ``C x T`` of them for each sequence, each supported on one
token (:meth:`Tokenwise.as_factor`); from there on the sweep costs ``C x T`` column
pull-backs per sequence, the rank of the token-level curvature (see
:mod:`secorder.structured.rules.attention`).

Jacobians (:mod:`secorder.structured.jacobians`):

* :class:`PerPosition`: a module applied to each position alone (positions are the
  dims ``1..k`` of its input and output), given by the Jacobian of one position's
  map on rows ``[N * P, *feat]``. A diagonal term at its output becomes tokenwise.
* :class:`Permute`: ``z = x.permute(perm)`` (``so.Transpose``; the channels-first
  view rules use for :meth:`~secorder.structured.curvature.Curvature.quadratic`).
* :class:`FlattenBatch`: ``z = x.flatten(0, k)``, which makes positions samples
  (the loss's per-sample curvature at ``z`` is tokenwise at ``x``).

:func:`channels_first` gives rules the curvature of a ``[N, *pos, *feat]`` tensor
in the channels-first layout ``[N, *feat, *pos]`` that
:meth:`~secorder.structured.curvature.Curvature.quadratic` reads (the parameter
diagonal of a layer applied at every position).

Example:
    >>> import torch
    >>> from secorder.structured.curvature import Factor
    >>> t = Tokenwise(Factor(torch.ones(1, 6, 2)), (3, 2, 2), (1,))  # 3 sequences, 2 tokens, 2 features
    >>> t.diagonal().shape, t.as_factor().B.shape  # one column per token becomes 2 per sequence
    (torch.Size([3, 2, 2]), torch.Size([2, 3, 2, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .curvature import Curvature, Diagonal, Factor, Gathered, SampledFactor, Shared, SoftmaxFactor, Term
from .jacobians import Elementwise, Jacobian

__all__ = ["Tokenwise", "PerPosition", "Permute", "FlattenBatch", "channels_first", "to_rows", "from_rows"]


def _rows_perm(ndim: int, pos: Sequence[int]) -> List[int]:
    """The permutation ``[0, *pos, *feat]`` of a tensor's dims (``feat``: the other non-batch dims)."""
    return [0] + list(pos) + [d for d in range(1, ndim) if d not in pos]


def to_rows(t: Tensor, lead: int, shape: Sequence[int], pos: Sequence[int]) -> Tensor:
    """``t`` of shape ``[*lead, *shape]`` as ``[*lead, N * P, *feat]`` (positions moved next to the batch).

    Example:
        >>> to_rows(torch.zeros(2, 5, 3), 0, (2, 5, 3), (2,)).shape  # positions are dim 2
        torch.Size([6, 5])
    """
    perm = _rows_perm(len(shape), pos)
    t = t.permute(list(range(lead)) + [lead + p for p in perm])
    P = math.prod([shape[p] for p in pos])
    feat = tuple(shape[d] for d in perm[1 + len(pos):])
    return t.reshape(tuple(t.shape[:lead]) + (shape[0] * P,) + feat)


def from_rows(t: Tensor, lead: int, shape: Sequence[int], pos: Sequence[int]) -> Tensor:
    """The inverse of :func:`to_rows`: ``[*lead, N * P, *feat]`` back to ``[*lead, *shape]``."""
    perm = _rows_perm(len(shape), pos)
    t = t.reshape(tuple(t.shape[:lead]) + tuple(shape[p] for p in perm))
    inv = [perm.index(i) for i in range(len(shape))]
    return t.permute(list(range(lead)) + [lead + i for i in inv])


@dataclass
class Tokenwise(Term):
    """Per-sample blocks that are block diagonal over positions: ``inner`` holds one block per row.

    ``shape`` is the tensor's shape ``[N, *dims]``; ``pos`` the position dims
    (increasing, each ``>= 1``); the other non-batch dims are the features. Row
    ``n * P + p`` of ``inner`` (a term at ``[N * P, *feat]``, see :func:`to_rows`)
    is the block of sample ``n`` at position ``p``. With ``index`` (``[N * Q]``,
    values in ``[0, P)``), ``inner`` has ``Q`` rows per sample instead, and row
    ``n * Q + q`` adds its block to position ``index[n * Q + q]`` (blocks landing on
    the same position add up).

    ``summed``: the rows' columns are independent zero-mean draws (the Monte-Carlo
    Fisher's sampled gradients, :class:`~secorder.structured.curvature.SampledFactor`),
    so the ``Q`` columns ``k`` of one sample may be replaced by their sum: one column
    per sample instead of one per position. ``u u^T`` with ``u = sum_t g_t`` is
    ``sum_t g_t g_t^T`` plus cross terms ``g_t g_s^T`` (``t != s``) of zero mean, so it
    is an unbiased estimate of the same token-level Fisher; it becomes explicit only
    where a module mixes positions (attention) or a parameter reads the positions
    together (:meth:`quadratic`), and costs ``K`` column pull-backs per sequence there
    instead of ``K x T``. The cross terms add at most ``2 E[entry]^2`` to the variance
    of each diagonal entry (the docs' transformers page derives it).
    """

    inner: Term
    shape: Tuple[int, ...]
    pos: Tuple[int, ...]
    index: Optional[Tensor] = None
    summed: bool = False

    def __post_init__(self) -> None:
        self.shape, self.pos = tuple(self.shape), tuple(self.pos)

    @property
    def positions(self) -> int:
        return math.prod([self.shape[p] for p in self.pos])

    def diagonal(self) -> Tensor:
        d = self.inner.diagonal()
        if self.index is not None:
            N, P = self.shape[0], self.positions
            Q = d.shape[0] // N if N else 0
            src = d.reshape((N, Q, math.prod(d.shape[1:])))
            idx = self.index.reshape(N, Q, 1).expand(src.shape)
            d = src.new_zeros((N, P, src.shape[-1])).scatter_add(1, idx, src).reshape((N * P,) + tuple(d.shape[1:]))
        return from_rows(d, 0, self.shape, self.pos)

    def quadratic(self, X: Tensor) -> Tensor:
        # With the positions last (the features first, as channels), a channel's block over
        # the positions is diagonal: the diagonal alone gives the quadratic forms.
        nd = len(self.shape)
        if self.summed and self._summable():
            return self.as_factor().quadratic(X)
        if self.pos == tuple(range(nd - len(self.pos), nd)) and X.shape[-1] == self.positions:
            return Diagonal(self.diagonal()).quadratic(X)
        return self.as_factor().quadratic(X)

    def _summable(self) -> bool:
        return self.index is None and isinstance(self.inner, Factor) and self.inner.w is None

    def as_factor(self) -> Factor:
        """Explicit per-sample columns: ``K`` columns per row become ``K * Q`` per sample, one row each
        (``K`` per sample, each the sum over the sample's rows, when :attr:`summed`)."""
        if self.summed and self._summable():
            B = self.inner.B  # [K, N * P, *feat]: a sample's rows are consecutive
            return Factor(from_rows(B, 1, self.shape, self.pos))
        return self.expanded()

    def expanded(self) -> Factor:
        """Explicit per-sample columns, one per row and column: ``K * Q`` per sample (never summed)."""
        f = self.inner.as_factor()
        B, w = f.B, f.w
        K, N, P = B.shape[0], self.shape[0], self.positions
        feat = tuple(B.shape[2:])
        Q = P if self.index is None else (B.shape[1] // N if N else 0)
        B = B.reshape((K, N, Q) + feat)
        ones = (1,) * len(feat)
        if self.index is None:
            place = torch.eye(P, dtype=B.dtype, device=B.device).reshape((1, P, 1, P) + ones)
            full = B.unsqueeze(1) * place  # [K, Q=P (column), N, P (position), *feat]
        else:
            place = (self.index.reshape(N, Q, 1) == torch.arange(P, device=B.device)).to(B.dtype)
            full = (B.unsqueeze(3) * place.reshape((1, N, Q, P) + ones)).transpose(1, 2)  # [K, Q, N, P, *feat]
        full = from_rows(full.reshape((K * Q, N * P) + feat), 1, self.shape, self.pos)
        if w is not None:
            w = w.reshape(K, N, Q).transpose(1, 2).reshape(K * Q, N)
        return Factor(full, w)

    def pulled(self, jac: Jacobian) -> Term:
        if isinstance(jac, Elementwise):
            return self._through_elementwise(jac)
        pull = getattr(jac, "pull_tokenwise", None)
        if pull is None:
            return jac.pull_factor(self.as_factor())
        return pull(self)

    def _through_elementwise(self, jac: Elementwise) -> Term:
        # Elementwise is per position in any layout: scale each row's block, stay per position.
        if self.index is not None or tuple(self.shape) != jac.shape:
            return jac.pull_factor(self.as_factor())
        m = to_rows(jac.m.expand(jac.shape), 0, jac.shape, self.pos)
        return Tokenwise(self.inner.pulled(Elementwise(m, tuple(m.shape))), self.shape, self.pos, summed=self.summed)


class PerPosition(Jacobian):
    """A module applied to each position alone: ``z[n, p] = h(x[n, p])`` for the positions ``p``.

    The positions are the dims ``1..npos`` of the input ``[N, *pos, *feat_in]`` and
    of the output ``[N, *pos, *feat_out]``; ``rows`` is the Jacobian of ``h`` on the
    rows ``[N * P, *feat]`` (a :class:`~secorder.structured.jacobians.Dense` for a
    linear layer). Tokenwise terms at the output are pulled row by row; a diagonal
    term becomes tokenwise; any other term goes through as columns.
    """

    def __init__(self, rows: Jacobian, in_shape: Sequence[int], out_shape: Sequence[int], npos: int):
        self.rows, self.in_shape, self.out_shape = rows, tuple(in_shape), tuple(out_shape)
        self.pos = tuple(range(1, npos + 1))
        self.R = math.prod(self.in_shape[: npos + 1])
        self.feat_in, self.feat_out = self.in_shape[npos + 1:], self.out_shape[npos + 1:]

    def t_columns(self, B: Tensor) -> Tensor:
        K = B.shape[0]
        out = self.rows.t_columns(B.reshape((K, self.R) + self.feat_out))
        return out.reshape((K,) + self.in_shape)

    def t_vector(self, g: Tensor) -> Tensor:
        return self.rows.t_vector(g.reshape((self.R,) + self.feat_out)).reshape(self.in_shape)

    def pull_diagonal(self, t: Diagonal) -> Term:
        inner = Diagonal(t.d.reshape((self.R,) + self.feat_out)).pulled(self.rows)
        return Tokenwise(inner, self.in_shape, self.pos)

    def pull_tokenwise(self, t: Tokenwise) -> Term:
        if t.pos == self.pos and t.shape == self.out_shape and t.index is None:
            return replace(t, inner=t.inner.pulled(self.rows), shape=self.in_shape, pos=self.pos)
        return self.pull_factor(t.as_factor())


class Permute(Jacobian):
    """``z = x.permute(perm)`` with ``perm[0] == 0`` (the batch stays first); ``shape`` is the input's."""

    def __init__(self, perm: Sequence[int], shape: Sequence[int]):
        self.perm, self.shape = tuple(perm), tuple(shape)
        if self.perm[0] != 0 or sorted(self.perm) != list(range(len(self.shape))):
            raise ValueError(f"perm must be a permutation of the dims that keeps dim 0 first, got {self.perm}")
        self.inv = tuple(self.perm.index(i) for i in range(len(self.perm)))

    def _back(self, t: Tensor, lead: int) -> Tensor:
        return t.permute(list(range(lead)) + [lead + i for i in self.inv])

    def t_columns(self, B: Tensor) -> Tensor:
        return self._back(B, 1)

    def t_vector(self, g: Tensor) -> Tensor:
        return self._back(g, 0)

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(self._back(t.d, 0))

    def pull_shared(self, t: Shared) -> Term:
        # Shared rows [K, *feat] permute like a tensor whose batch dim is K.
        return Shared(self._back(t.B, 0), t.r, None if t.s is None else self._back(t.s, 0))

    def pull_tokenwise(self, t: Tokenwise) -> Term:
        xpos = [self.perm[i] for i in t.pos]
        if xpos != sorted(xpos):  # the rows would come in another order
            return self.pull_factor(t.as_factor())
        zfeat = [i for i in range(1, len(self.perm)) if i not in t.pos]
        xfeat = sorted(self.perm[i] for i in zfeat)
        row_perm = [0] + [1 + xfeat.index(self.perm[i]) for i in zfeat]
        inner = t.inner
        if row_perm != sorted(row_perm):
            R = t.index.shape[0] if t.index is not None else t.shape[0] * t.positions
            row_shape = (R,) + tuple(self.shape[d] for d in xfeat)
            inner = inner.pulled(Permute(row_perm, row_shape))
        return replace(t, inner=inner, shape=self.shape, pos=tuple(xpos))


class FlattenBatch(Jacobian):
    """``z = x.flatten(0, end)``: the dims ``1..end`` of ``x`` (shape ``shape``) become samples of ``z``.

    The curvature at ``z`` is per row of ``z``; at ``x`` that is a
    :class:`Tokenwise` term with those dims as positions, whatever the kind.
    ``t_columns`` is the transposed map of whole tensors (a reshape); the
    curvature never goes through it.
    """

    def __init__(self, shape: Sequence[int], end: int):
        self.shape, self.end = tuple(shape), end
        self.pos = tuple(range(1, end + 1))

    def t_columns(self, B: Tensor) -> Tensor:
        return B.reshape((B.shape[0],) + self.shape)

    def t_vector(self, g: Tensor) -> Tensor:
        return g.reshape(self.shape)

    def _wrap(self, t: Term) -> Term:
        return Tokenwise(t, self.shape, self.pos)

    def pull_factor(self, t: Factor) -> Term:
        # Sampled zero-mean columns of tokens: summable per sequence (see Tokenwise).
        return Tokenwise(t, self.shape, self.pos, summed=isinstance(t, SampledFactor))

    def pull_diagonal(self, t: Diagonal) -> Term:
        return Diagonal(t.d.reshape(self.shape))

    def pull_shared(self, t: Shared) -> Term:
        return self._wrap(t)

    def pull_gathered(self, t: Gathered) -> Term:
        return self._wrap(t)

    def pull_softmax(self, t: SoftmaxFactor) -> Term:
        return self._wrap(t)  # stays implicit: a linear layer at every position pulls it back unformed

    def pull_tokenwise(self, t: Tokenwise) -> Term:
        if t.index is not None:
            return self._wrap(t)
        # Positions of z's rows are positions of x too: rows ordered (n, p_x, p_z) either way.
        return replace(t, shape=self.shape, pos=self.pos + tuple(p + self.end for p in t.pos))


def channels_first(curv: Curvature, shape: Sequence[int], nfeat: int) -> Curvature:
    """The curvature of a ``[N, *pos, *feat]`` tensor (``nfeat`` trailing feature dims) as that of ``[N, *feat, *pos]``.

    :meth:`~secorder.structured.curvature.Curvature.quadratic` views features as
    channels first, positions last; a layer applied at every position (a linear
    layer on ``[N, T, d]``) has its channels last. Tokenwise terms only change
    their layout; others are permuted.

    Example:
        >>> c = Curvature([Diagonal(torch.arange(6.).reshape(1, 3, 2))])  # [N=1, T=3, d=2]
        >>> channels_first(c, (1, 3, 2), 1).diagonal()
        tensor([[[0., 2., 4.],
                 [1., 3., 5.]]])
    """
    nd = len(shape)
    npos = nd - 1 - nfeat
    if npos == 0:
        return curv
    perm = [0] + [1 + nfeat + i for i in range(npos)] + [1 + i for i in range(nfeat)]
    y_shape = (shape[0],) + tuple(shape[1 + npos:]) + tuple(shape[1:1 + npos])
    return curv.pulled(Permute(perm, y_shape))
