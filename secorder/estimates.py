"""Companion transforms that return the estimate *with* its error bar.

:func:`trace_estimate` and :func:`hessian_diag_estimate` take the same arguments
as :func:`secorder.trace` and :func:`secorder.hessian_diag` (stochastic ``method``
by default) and return a :class:`secorder.results.TraceEstimate` /
:class:`secorder.results.DiagonalEstimate`: value, standard error, matvec count,
why sampling stopped and, for the trace, the trace of each leaf's diagonal
block from the same probes, laid out like the differentiated argument. Both are
``NamedTuple`` pytrees of tensors, so the transformed functions compose with
``vmap`` (without adaptive stopping, which decides on the host).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from . import _checks, tree
from .estimators import exact
from .results import STOP_NUM_SAMPLES, DiagonalEstimate, TraceEstimate
from .stochastic import DIAG_METHODS, TRACE_METHODS
from .stochastic import estimate_diagonal, estimate_trace
from .transforms import _checked_options, _hessian_operator, _Problem

__all__ = ["trace_estimate", "hessian_diag_estimate"]


def _unbind(spec: Any, per_leaf: torch.Tensor) -> Any:
    return tree.unflatten(spec, list(per_leaf.unbind(0)))


def trace_estimate(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    method: str = "hutchinson",
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: str = "rademacher",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Hessian trace estimate with error bar: ``trace_estimate(f)(*args)`` is a ``TraceEstimate``.

    Options as in :func:`secorder.trace`; ``method`` defaults to ``"hutchinson"``
    (``"exact"`` gives ``stderr = 0`` and one matvec per parameter entry).
    ``per_leaf``/``per_leaf_stderr`` are pytrees shaped like ``args[argnums]`` with
    0-dim leaves. With ``has_aux=True`` the function returns ``(estimate, aux)``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda p: (p["w"] ** 4).sum() / 12 + (p["b"] ** 2).sum()
        >>> p = {"w": torch.tensor([1., 2.]), "b": torch.tensor([3.])}
        >>> est = so.trace_estimate(f, num_samples=10, seed=0)(p)
        >>> est.value, est.stderr, int(est.num_matvecs)
        (tensor(7.), tensor(0.), 10)
        >>> est.per_leaf
        {'w': tensor(5.), 'b': tensor(2.)}
        >>> lo, hi = est.interval(0.95)
    """
    options = _checked_options(argnums, chunk_size, method, TRACE_METHODS, None,
                               num_samples, seed, generator, distribution, rtol, atol, max_matvecs)

    @functools.wraps(f)
    def estimate_fn(*args: Any) -> Any:
        problem = _Problem(f, argnums, has_aux, args)
        op = _hessian_operator(problem)
        if method == "exact":
            per_leaf = exact.exact_trace_by_leaf(op, chunk_size)
            zero = torch.zeros_like(per_leaf)
            device = per_leaf.device
            est = TraceEstimate(
                per_leaf.sum(), zero.sum(), torch.tensor(op.dim, device=device), per_leaf, zero,
                torch.tensor(STOP_NUM_SAMPLES, device=device),
            )
        else:
            est = estimate_trace(op, method, options, chunk_size)
        est = est._replace(
            per_leaf=_unbind(problem.spec, est.per_leaf),
            per_leaf_stderr=_unbind(problem.spec, est.per_leaf_stderr),
        )
        return (est, problem.aux()) if has_aux else est

    return estimate_fn


def hessian_diag_estimate(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    method: str = "hutchinson",
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: str = "rademacher",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Hessian diagonal estimate with entrywise error bars: returns a ``DiagonalEstimate``.

    Options as in :func:`secorder.hessian_diag`; ``method`` defaults to
    ``"hutchinson"`` (``"xdiag"`` or ``"exact"`` otherwise). ``value`` and
    ``stderr`` are pytrees shaped like ``args[argnums]``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (x ** 4).sum() / 12
        >>> est = so.hessian_diag_estimate(f, num_samples=4, seed=0)(torch.tensor([1., 2.]))
        >>> est.value, est.stderr, int(est.num_matvecs)
        (tensor([1., 4.]), tensor([0., 0.]), 4)
    """
    options = _checked_options(argnums, chunk_size, method, DIAG_METHODS, None,
                               num_samples, seed, generator, distribution, rtol, atol, max_matvecs)

    @functools.wraps(f)
    def estimate_fn(*args: Any) -> Any:
        problem = _Problem(f, argnums, has_aux, args)
        op = _hessian_operator(problem)
        if method == "exact":
            value = exact.exact_diagonal(op, chunk_size)
            device = value[0].device
            est = DiagonalEstimate(
                value, [torch.zeros_like(v) for v in value], torch.tensor(op.dim, device=device),
                torch.tensor(STOP_NUM_SAMPLES, device=device),
            )
        else:
            est = estimate_diagonal(op, method, options, chunk_size)
        est = est._replace(value=tree.unflatten(problem.spec, est.value), stderr=tree.unflatten(problem.spec, est.stderr))
        return (est, problem.aux()) if has_aux else est

    return estimate_fn
