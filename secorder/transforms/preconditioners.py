"""Preconditioners of :func:`secorder.solve`: one registry entry per ``preconditioner=`` name.

A :class:`Preconditioner` builds, once per call, ``M^-1`` on ``(k, n)`` matrices of
row vectors (symmetric positive definite, an approximation of the inverse of
``C + damping I``) from a :class:`PreconditionerContext`: the call's problem,
its curvature operator, the curvature name, the damping and the call's generator.
The solvers only see the function it returns. A new preconditioner is one
:func:`register` call (``REGISTRY.register_lazy`` for one in a module that
imports something optional).

* ``"diagonal"`` (Jacobi): ``M = |diag(C)| + damping``, from the exact diagonal of
  the same curvature: the operator's own diagonal where it has one (the
  ``J^T H J`` curvatures: per-sample loss-factor products), else the structured
  engine (curvature backpropagation), else one-hot columns (``n`` block products:
  small models only). Entries that vanish are floored at ``1e-8`` of the largest.
* ``"kfac"``: the Kronecker-factored approximation of the curvature
  (:func:`secorder.kfac`, ``fisher_type`` matched to the curvature: ``type-2``
  for the GGN and the Hessian, ``mc`` for the Fisher, ``empirical`` for the
  empirical Fisher), inverted exactly with the damping through its factors'
  eigendecompositions (a relative damping of ``1e-3`` of its mean eigenvalue when
  ``damping=0``).

Example:
    >>> names()
    ('diagonal', 'kfac')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import tree
from ..estimators.exact import exact_diagonal
from ..operators import LeafOperator
from ..problem import Problem
from ..registry import Registry
from . import engine as _engine

__all__ = ["Preconditioner", "PreconditionerContext", "REGISTRY", "register", "names", "get", "build"]

Apply = Callable[[Tensor], Tensor]

#: Diagonal entries below this fraction of the largest are raised to it (Jacobi stays positive definite).
DIAGONAL_FLOOR = 1e-8


@dataclass(frozen=True)
class PreconditionerContext:
    """What a preconditioner may use to build ``M^-1`` for one call.

    Fields:
        problem: the call's :class:`~secorder.problem.Problem`.
        op: the call's curvature operator.
        to_flat: leaf list with a leading dim ``k`` to ``(k, n)`` rows in the working dtype.
        to_leaves: the inverse of ``to_flat``.
        curvature: the curvature name.
        damping: the damping of the solve.
        mc_samples: the Fisher's label draws per sample.
        generator: the call's generator (``None``: the global RNG).
        chunk_size: a memory bound for exact diagonals (``None``: default).
    """

    problem: Problem
    op: LeafOperator
    to_flat: Callable[[List[Tensor]], Tensor]
    to_leaves: Callable[[Tensor], List[Tensor]]
    curvature: str
    damping: float
    mc_samples: int
    generator: Optional[torch.Generator]
    chunk_size: Optional[int] = None


@dataclass(frozen=True)
class Preconditioner:
    """One ``preconditioner=`` of :func:`secorder.solve`.

    Fields:
        name: the ``preconditioner=`` value.
        build: ``build(context) -> M^-1`` on ``(k, n)`` rows.
        summary: one line for the docs.
    """

    name: str
    build: Callable[[PreconditionerContext], Apply]
    summary: str = ""


REGISTRY: Registry = Registry("preconditioner")


def register(preconditioner: Preconditioner) -> Preconditioner:
    """Add ``preconditioner`` under its name (which must be new); returns it."""
    return REGISTRY.register(preconditioner.name, preconditioner)


def names() -> Tuple[str, ...]:
    """The registered ``preconditioner=`` values."""
    return tuple(REGISTRY.names())


def get(name: Any) -> Optional[Preconditioner]:
    """``None`` for ``None``, else the registered preconditioner, or an error listing the valid ones.

    Example:
        >>> get("ilu")
        Traceback (most recent call last):
        ...
        ValueError: unknown preconditioner 'ilu'; valid preconditioners are 'diagonal', 'kfac' (or None)
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"preconditioner must be None or a str, one of {', '.join(map(repr, names()))}; "
                        f"got {type(name).__name__}")
    try:
        return REGISTRY.get(name)
    except ValueError as err:
        raise ValueError(f"{err} (or None)") from None


def build(preconditioner: Optional[Preconditioner], context: PreconditionerContext) -> Optional[Apply]:
    """``M^-1`` for the call, or ``None`` without a preconditioner."""
    return None if preconditioner is None else preconditioner.build(context)


def _exact_diagonal(context: PreconditionerContext) -> List[Tensor]:
    """The exact diagonal of the curvature: the operator's own, the structured engine's, or one-hot columns."""
    op = context.op
    if op.diagonal is not None:
        return list(op.diagonal(context.chunk_size))
    p = context.problem
    recorder = lambda: None  # noqa: E731 - the engine records its path on a function; nobody reads this one
    hit = _engine.attempt(recorder, p.f, p.argnums, p.has_aux, p.args, p.kwargs, "auto", context.curvature, False,
                          "solve: diagonal preconditioner", mc_samples=context.mc_samples, generator=context.generator)
    if hit is not None:
        return tree.leaves(hit)
    return exact_diagonal(op, context.chunk_size)


def _diagonal(context: PreconditionerContext) -> Apply:
    d = context.to_flat([leaf[None] for leaf in _exact_diagonal(context)])[0].abs()
    d = torch.maximum(d, DIAGONAL_FLOOR * d.max()) if d.numel() else d
    d = d + context.damping
    if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
        raise ValueError("preconditioner='diagonal': the curvature's diagonal is zero or not finite; add damping or "
                         "pass preconditioner=None")
    inverse = 1.0 / d
    return lambda R: R * inverse


#: ``so.kfac``'s ``fisher_type`` that approximates each curvature (the Hessian by its GGN's K-FAC).
KFAC_FISHER_TYPES = {"hessian": "type-2", "ggn": "type-2", "fisher": "mc", "empirical_fisher": "empirical"}
#: Without damping, the K-FAC preconditioner is damped by this fraction of its mean eigenvalue.
KFAC_RELATIVE_DAMPING = 1e-3


def _kfac(context: PreconditionerContext) -> Apply:
    import secorder

    kfac = getattr(secorder, "kfac", None)
    if kfac is None:
        raise ValueError("preconditioner='kfac' needs secorder's K-FAC transform (so.kfac), which this build of "
                         "secorder does not have; use preconditioner='diagonal'")
    p = context.problem
    if isinstance(p.argnums, bool) or p.argnums != 0 or p.has_aux or p.kwargs:
        raise ValueError("preconditioner='kfac' needs f(params, inputs, targets) differentiated in params "
                         "(argnums=0, has_aux=False, no keyword arguments)")
    fisher_type = KFAC_FISHER_TYPES.get(context.curvature, "type-2")
    options = dict(mc_samples=context.mc_samples, generator=context.generator) if fisher_type == "mc" else {}
    K = kfac(p.f, fisher_type=fisher_type, **options)(*p.args)
    damping = context.damping
    if damping == 0.0:
        damping = KFAC_RELATIVE_DAMPING * float(K.trace()) / max(K.num_parameters, 1)
        if not damping > 0:
            raise ValueError("preconditioner='kfac': the K-FAC approximation is zero; pass damping > 0")
    inverse = K.inverse(damping)
    return lambda R: context.to_flat(inverse.matvec_leaves(context.to_leaves(R)))


register(Preconditioner("diagonal", _diagonal,
                        summary="Jacobi: |exact diagonal of the curvature| + damping"))
register(Preconditioner("kfac", _kfac,
                        summary="the K-FAC approximation of the curvature, inverted exactly with the damping"))
