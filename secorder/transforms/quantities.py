"""Diagonals and traces of any curvature: ``trace``, ``trace_estimate``, ``diagonal``, ``diagonal_estimate``.

Thin wrappers over the private core (:mod:`secorder.transforms._core`): each takes
``f`` and options and returns a function of ``f``'s arguments. The curvature is
chosen with ``curvature=`` (:func:`secorder.operators.names`), the method with
``method=`` (:func:`secorder.estimators.registry.names`); every method works for
every curvature.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import _checks
from . import _core

__all__ = ["trace", "trace_estimate", "diagonal", "diagonal_estimate"]


def _transform(quantity: str, what: str, full: bool, f: Callable[..., Any], argnums: Any, **options: Any):
    request = _core.make_request(f, quantity, argnums=argnums, **options)
    return _core.quantity_transform(request, f, what, full=full)


def trace(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    method: str = "exact",
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    engine: str = "auto",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: Optional[str] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Trace transform: ``trace(f)(*args, **kwargs)`` is the trace of a curvature of ``f``, a 0-dim tensor.

    Args:
        f: a function returning a scalar tensor (``(scalar, aux)`` with ``has_aux``);
            for ``curvature`` other than ``"hessian"``, an ``f`` made by
            :func:`secorder.functional_loss`.
        argnums: which positional argument(s) to differentiate (an int or a tuple),
            any pytree of floating-point tensors.
        curvature: ``"hessian"`` (default), ``"ggn"`` (generalised Gauss-Newton),
            ``"fisher"`` (Monte-Carlo Fisher) or ``"empirical_fisher"``.
        method: ``"exact"`` (one-hot block products, or the structured engine),
            ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"xnystrace"`` (PSD
            curvatures only); see :mod:`secorder.estimators.registry`.
        has_aux: ``f`` returns ``(loss, aux)``; the function then returns
            ``(trace, aux)``.
        chunk_size: columns or probes per batched matvec (memory bound); ``None``
            chooses automatically.
        engine: ``"auto"``, ``"structured"`` or ``"generic"`` (see
            :mod:`secorder.transforms.engine`); the path taken is stored in the
            returned function's ``last_engine``.
        mc_samples: labels drawn per sample for ``curvature="fisher"`` (an int >= 1).
        num_samples: matvecs of a stochastic method (default per method).
        seed: seeds a fresh generator on every call: same seed, same result.
        generator: a ``torch.Generator`` to draw from (advanced), instead of ``seed``.
        distribution: probe distribution: ``"rademacher"``, ``"normal"``,
            ``"sphere"`` or ``"sparse"``; ``None`` (default): the method's own,
            Rademacher for ``"hutchinson"`` and ``"xdiag"``, normal for ``"hutch++"``,
            ``"xtrace"`` and ``"xnystrace"`` (whose intervals keep their coverage with
            normal test vectors, see :mod:`secorder.estimators.registry`).
        rtol: adaptive stopping (``"hutchinson"``, ``"hutch++"``): relative tolerance
            of the standard error.
        atol: adaptive stopping: absolute tolerance of the standard error.
        max_matvecs: adaptive stopping: the matvec budget.

    Returns:
        A function of ``f``'s arguments (keyword arguments are passed to ``f``)
        returning the trace as a 0-dim tensor. Differentiable (``grad`` of it is a
        curvature penalty's gradient) and ``vmap``-able. For the Fisher, labels are
        drawn from the model's predictive distribution with the same ``seed`` /
        ``generator`` as the probes (labels first), so ``seed`` also applies with
        ``method="exact"``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x, y: ((x * y) ** 2).sum()
        >>> so.trace(f)(torch.tensor([1., 2.]), torch.tensor([3., 4.]))
        tensor(50.)
        >>> g = so.trace(lambda x: (x ** 4).sum() / 12, method="hutchinson", num_samples=8, seed=0)
        >>> g(torch.tensor([1., 2.]))   # diagonal Hessian: Rademacher probes are exact
        tensor(5.)
        >>> model = torch.nn.Linear(2, 1)
        >>> loss = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> so.trace(loss, curvature="ggn")(so.params_dict(model), torch.ones(1, 2), torch.zeros(1, 1))
        tensor(6.)
    """
    return _transform("trace", "trace", False, f, argnums, curvature=curvature, method=method, has_aux=has_aux,
                      chunk_size=chunk_size, engine=engine, mc_samples=mc_samples, num_samples=num_samples,
                      seed=seed, generator=generator, distribution=distribution, rtol=rtol, atol=atol,
                      max_matvecs=max_matvecs)


def trace_estimate(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    method: str = "hutchinson",
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    engine: str = "auto",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: Optional[str] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Trace estimate with error bar: ``trace_estimate(f)(*args)`` is a :class:`~secorder.results.TraceEstimate`.

    Args:
        f: as in :func:`trace`.
        argnums: as in :func:`trace`.
        curvature: as in :func:`trace`.
        method: as in :func:`trace`, default ``"hutchinson"`` (``"exact"`` gives
            ``stderr = 0``).
        has_aux: the function returns ``(estimate, aux)``.
        chunk_size: as in :func:`trace`.
        engine: as in :func:`trace` (used by ``method="exact"``).
        mc_samples: as in :func:`trace`.
        num_samples: as in :func:`trace`.
        seed: as in :func:`trace`.
        generator: as in :func:`trace`.
        distribution: as in :func:`trace`.
        rtol: as in :func:`trace`.
        atol: as in :func:`trace`.
        max_matvecs: as in :func:`trace`.

    Returns:
        A function returning the estimate: ``value``, ``stderr`` (with ``dof`` degrees
        of freedom: ``interval()`` uses Student's t), ``num_matvecs``, ``stop`` and
        ``per_leaf``/``per_leaf_stderr``, pytrees shaped like ``args[argnums]`` with
        0-dim leaves (the trace of each leaf's diagonal block, from the same probes).

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
    return _transform("trace", "trace_estimate", True, f, argnums, curvature=curvature, method=method,
                      has_aux=has_aux, chunk_size=chunk_size, engine=engine, mc_samples=mc_samples,
                      num_samples=num_samples, seed=seed, generator=generator, distribution=distribution,
                      rtol=rtol, atol=atol, max_matvecs=max_matvecs)


def diagonal(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    method: str = "exact",
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    engine: str = "auto",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: Optional[str] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Diagonal transform: ``diagonal(f)(*args)`` is the diagonal of a curvature, shaped like ``args[argnums]``.

    The exact diagonal never builds the matrix: one-hot products leaf by leaf (a
    leaf's columns need only its diagonal block), ``chunk_size`` columns per
    ``vmap``-batched product, so peak extra memory is about ``chunk_size`` times the
    leaf size; or, when ``f`` comes from :func:`secorder.functional_loss` and the
    model qualifies, curvature backpropagation in the time of a few backward passes
    (:mod:`secorder.transforms.engine`). That engine stays in use inside ``torch.func``:
    ``vmap`` over per-example inputs gives every example's diagonal from one sweep;
    the result holds ``N x n`` numbers (``n`` parameters), and the sweep needs about
    the memory of one sweep over the whole batch besides it
    (:mod:`secorder.structured.dispatch`).

    Args:
        f: as in :func:`trace`.
        argnums: as in :func:`trace`.
        curvature: as in :func:`trace`.
        method: ``"exact"`` (default), ``"hutchinson"`` (Bekas et al. 2007) or
            ``"xdiag"`` (Epperly et al. 2024).
        has_aux: the function returns ``(diagonal, aux)``.
        chunk_size: as in :func:`trace`.
        engine: as in :func:`trace`.
        mc_samples: as in :func:`trace`.
        num_samples: as in :func:`trace`.
        seed: as in :func:`trace`.
        generator: as in :func:`trace`.
        distribution: as in :func:`trace`.
        rtol: as in :func:`trace` (``"hutchinson"``; on the worst entry).
        atol: as in :func:`trace`.
        max_matvecs: as in :func:`trace`.

    Returns:
        A function returning the diagonal, a pytree shaped like ``args[argnums]``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda p: (p["w"] ** 2).sum() * p["b"].sum()
        >>> d = so.diagonal(f)({"w": torch.tensor([1., 2.]), "b": torch.tensor([3.])})
        >>> d["w"], d["b"]
        (tensor([6., 6.]), tensor([0.]))
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> loss = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> x, y = torch.tensor([[1., 2.], [3., 0.]]), torch.zeros(2, 1)
        >>> so.diagonal(loss, curvature="empirical_fisher")({"weight": torch.ones(1, 2)}, x, y)["weight"]
        tensor([[360., 144.]])
    """
    return _transform("diagonal", "diagonal", False, f, argnums, curvature=curvature, method=method,
                      has_aux=has_aux, chunk_size=chunk_size, engine=engine, mc_samples=mc_samples,
                      num_samples=num_samples, seed=seed, generator=generator, distribution=distribution,
                      rtol=rtol, atol=atol, max_matvecs=max_matvecs)


def diagonal_estimate(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    method: str = "hutchinson",
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    engine: str = "auto",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: Optional[str] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Diagonal estimate with entrywise error bars: returns a :class:`~secorder.results.DiagonalEstimate`.

    Args:
        f: as in :func:`trace`.
        argnums: as in :func:`trace`.
        curvature: as in :func:`trace`.
        method: as in :func:`diagonal`, default ``"hutchinson"``.
        has_aux: the function returns ``(estimate, aux)``.
        chunk_size: as in :func:`trace`.
        engine: as in :func:`trace` (used by ``method="exact"``).
        mc_samples: as in :func:`trace`.
        num_samples: as in :func:`trace`.
        seed: as in :func:`trace`.
        generator: as in :func:`trace`.
        distribution: as in :func:`trace`.
        rtol: as in :func:`diagonal`.
        atol: as in :func:`diagonal`.
        max_matvecs: as in :func:`diagonal`.

    Returns:
        A function returning the estimate: ``value`` and ``stderr`` pytrees shaped like
        ``args[argnums]``, ``num_matvecs``, ``stop`` and ``dof``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (x ** 4).sum() / 12
        >>> est = so.diagonal_estimate(f, num_samples=4, seed=0)(torch.tensor([1., 2.]))
        >>> est.value, est.stderr, int(est.num_matvecs)
        (tensor([1., 4.]), tensor([0., 0.]), 4)
    """
    return _transform("diagonal", "diagonal_estimate", True, f, argnums, curvature=curvature, method=method,
                      has_aux=has_aux, chunk_size=chunk_size, engine=engine, mc_samples=mc_samples,
                      num_samples=num_samples, seed=seed, generator=generator, distribution=distribution,
                      rtol=rtol, atol=atol, max_matvecs=max_matvecs)
