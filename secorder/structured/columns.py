"""The column algebra of block rules: one set of columns pulled back along several paths, then summed.

A block whose output is a sum over paths (``so.Residual``: ``x + body(x)``;
``so.Parallel``: ``f_1(x) + f_2(x)`` or a concatenation) has the input curvature
``(sum_i J_i)^T H (sum_i J_i)``. With ``H = sum_k w_k b_k b_k^T`` that is
``sum_k w_k (sum_i J_i^T b_k)(sum_i J_i^T b_k)^T``: the columns of ``H`` go
through every path and add up column by column. :func:`column_form` gives those
columns for any term (per position when the term is
:class:`~secorder.structured.tokens.Tokenwise`, so that a token-level
curvature stays per token through blocks of per-token modules),
:func:`add_columns` adds two pull-backs of the same columns, and
:func:`narrow` cuts a term to the slice of the output one branch of a
concatenation produces.

Example:
    >>> import torch
    >>> from secorder.structured.curvature import Factor
    >>> b = Factor(torch.ones(2, 1, 3))
    >>> add_columns(b, b).diagonal()  # (b + b)(b + b)^T, twice
    tensor([[8., 8., 8.]])
"""

from __future__ import annotations

from .curvature import Diagonal, Factor, Shared, Term
from .tokens import Tokenwise

__all__ = ["column_form", "add_columns", "narrow"]


def column_form(term: Term) -> Term:
    """``term`` as explicit columns, per position when it is tokenwise (a Factor, or a Tokenwise of one).

    Example:
        >>> import torch
        >>> column_form(Diagonal(torch.ones(2, 3))).B.shape
        torch.Size([3, 2, 3])
    """
    if isinstance(term, Factor):
        return term
    if isinstance(term, Tokenwise):
        return Tokenwise(column_form(term.inner), term.shape, term.pos, term.index, term.summed)
    return term.as_factor()


def add_columns(a: Term, b: Term) -> Term:
    """The columns of ``a`` plus those of ``b``, two pull-backs of the same :func:`column_form` columns.

    Column ``k`` of the result is ``a_k + b_k`` with the columns' shared weights.
    Tokenwise columns of the same layout add row by row; otherwise both become
    per-sample columns, which come in the same order for both (see
    :meth:`~secorder.structured.tokens.Tokenwise.as_factor`).

    Example:
        >>> import torch
        >>> f = Factor(torch.ones(2, 1, 3))
        >>> add_columns(f, f).B[0]
        tensor([[2., 2., 2.]])
    """
    if (isinstance(a, Tokenwise) and isinstance(b, Tokenwise) and a.shape == b.shape and a.pos == b.pos
            and a.index is None and b.index is None):
        return Tokenwise(add_columns(a.inner, b.inner), a.shape, a.pos, summed=a.summed and b.summed)
    fa, fb = a.as_factor(), b.as_factor()
    if fa.B.shape[0] != fb.B.shape[0]:
        # One side summed its tokens' columns per sequence (a summed Tokenwise), the other
        # pulled them back one per token: give the summed side its columns per token too.
        fa, fb = _expanded(a), _expanded(b)
    return Factor(fa.B + fb.B, fb.w)


def _expanded(t: Term) -> Factor:
    return t.expanded() if isinstance(t, Tokenwise) else t.as_factor()


def narrow(term: Term, dim: int, start: int, length: int) -> Term:
    """The block of ``term`` for the slice ``start:start + length`` of tensor dim ``dim`` (``>= 1``).

    Example:
        >>> import torch
        >>> narrow(Diagonal(torch.arange(4.).reshape(1, 4)), 1, 1, 2).d
        tensor([[1., 2.]])
    """
    if isinstance(term, Diagonal):
        return Diagonal(term.d.narrow(dim, start, length))
    if isinstance(term, Factor):
        return Factor(term.B.narrow(dim + 1, start, length), term.w)
    if isinstance(term, Shared):
        s = None if term.s is None else term.s.narrow(dim, start, length)
        return Shared(term.B.narrow(dim, start, length), term.r, s)
    if isinstance(term, Tokenwise) and dim not in term.pos:
        # A feature dim: cut every row's block; in the rows it is the feature dim of the same rank.
        feat = [i for i in range(1, len(term.shape)) if i not in term.pos]
        shape = list(term.shape)
        shape[dim] = length
        return Tokenwise(narrow(term.inner, 1 + feat.index(dim), start, length), tuple(shape), term.pos, term.index,
                         term.summed)
    return narrow(term.as_factor(), dim, start, length)
