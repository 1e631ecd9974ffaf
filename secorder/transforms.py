"""The user-facing transforms: ``hvp``, ``hessian_diag`` and ``trace``.

Each takes a function ``f(*args)`` returning a scalar tensor and returns a new,
stateless function of the same arguments. The differentiated argument(s) are
chosen with ``argnums`` (an int or a tuple of ints, as in ``torch.func.grad``) and
may be any pytree of floating-point tensors. The returned functions compose with
``torch.func.vmap``, ``torch.func.grad`` and ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from . import _checks, tree
from .estimators import exact
from .operators import LeafOperator, hessian_operator
from .stochastic import DIAG_METHODS, TRACE_METHODS, StochasticOptions, check_options
from .stochastic import estimate_diagonal, estimate_trace
from .structured import hook as _structured

__all__ = ["hvp", "hessian_diag", "trace"]

class _Problem:
    """One call's view of ``f``: the differentiated leaves and ``f`` as a function of them."""

    def __init__(self, f: Callable[..., Any], argnums: _checks.Argnums, has_aux: bool, args: tuple):
        self.resolved = _checks.normalize_argnums(argnums, len(args))
        self.primals = _checks.select(args, argnums, self.resolved)
        _checks.check_differentiable(self.primals, argnums)
        self.leaves, self.spec = tree.flatten(self.primals)
        self._f, self._argnums, self._has_aux, self._args = f, argnums, has_aux, args

    def call(self, primals: Any) -> Any:
        return self._f(*_checks.replace(self._args, self._argnums, self.resolved, primals))

    def loss(self, primals: Any) -> Tensor:
        return _checks.check_scalar(self.call(primals), self._has_aux)

    def loss_and_aux(self, primals: Any) -> Any:
        out = self.call(primals)
        return _checks.check_scalar(out, True), out[1]

    def loss_of_leaves(self, leaves: List[Tensor]) -> Tensor:
        return self.loss(tree.unflatten(self.spec, leaves))

    def aux(self) -> Any:
        """``f``'s auxiliary output at the primal point (one extra call of ``f``)."""
        return self.call(self.primals)[1]


def _check_method(method: str, valid: tuple) -> None:
    if method not in valid:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(map(repr, valid))}")


def _checked_options(
    argnums: Any,
    chunk_size: Optional[int],
    method: str,
    stochastic_methods: Tuple[str, ...],
    engine: Optional[str],
    *option_values: Any,
) -> StochasticOptions:
    """Validate the options shared by ``trace``/``hessian_diag`` and their estimate
    companions (``engine`` is checked where given) and bundle the stochastic ones."""
    _checks.check_argnums(argnums)
    _checks.check_chunk_size(chunk_size)
    _check_method(method, ("exact",) + stochastic_methods)
    if engine is not None:
        _structured.check_engine(engine)
    options = StochasticOptions(*option_values)
    check_options(method, options, stochastic_methods)
    return options


def hvp(f: Callable[..., Any], argnums: _checks.Argnums = 0, *, has_aux: bool = False) -> Callable[..., Any]:
    """Hessian-vector product transform: ``hvp(f)(*args, v) = H v``.

    ``H`` is the Hessian of the scalar ``f`` with respect to ``args[argnums]`` and
    ``v`` is a tangent shaped like ``args[argnums]`` (a tuple of pytrees when
    ``argnums`` is a tuple). Computed forward-over-reverse (``jvp`` of ``grad``),
    at the cost of about two gradient evaluations; where PyTorch's forward-mode
    rules fail with "ZeroTensors are immutable" (``mse_loss``, linear layers with
    a frozen weight: pytorch/pytorch#123996), reverse-over-reverse instead. With ``has_aux=True``, ``f``
    returns ``(loss, aux)`` and the transformed function returns ``(Hv, aux)``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (x ** 3).sum()
        >>> so.hvp(f)(torch.tensor([1., 2.]), torch.tensor([1., 1.]))
        tensor([ 6., 12.])
    """
    _checks.check_argnums(argnums)

    @functools.wraps(f)
    def hvp_fn(*args_and_v: Any) -> Any:
        if len(args_and_v) < 2:
            raise TypeError("the hvp function takes f's arguments followed by the tangent v")
        *args, v = args_and_v
        problem = _Problem(f, argnums, has_aux, tuple(args))
        tree.check_like(v, problem.primals, "v")
        try:
            return _forward_over_reverse(problem, v, has_aux)
        except RuntimeError as err:
            if "ZeroTensors are immutable" not in str(err):
                raise
            # PyTorch's forward-mode rules of some ops (mse_loss, linear layers with
            # a constant weight) mutate a ZeroTensor (pytorch/pytorch issues 112013,
            # 123996); reverse-over-reverse computes the same product.
            return _reverse_over_reverse(problem, v, has_aux)

    return hvp_fn


def _forward_over_reverse(problem: _Problem, v: Any, has_aux: bool) -> Any:
    if has_aux:
        _, hv, aux = jvp(grad(problem.loss_and_aux, has_aux=True), (problem.primals,), (v,), has_aux=True)
        return hv, aux
    return jvp(grad(problem.loss), (problem.primals,), (v,))[1]


def _reverse_over_reverse(problem: _Problem, v: Any, has_aux: bool) -> Any:
    if has_aux:
        _, grad_vjp, aux = vjp(grad(problem.loss_and_aux, has_aux=True), problem.primals, has_aux=True)
        return grad_vjp(v)[0], aux
    _, grad_vjp = vjp(grad(problem.loss), problem.primals)
    return grad_vjp(v)[0]


def hessian_diag(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    method: str = "exact",
    engine: str = "auto",
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: str = "rademacher",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Exact Hessian diagonal transform: ``hessian_diag(f)(*args)`` is shaped like ``args[argnums]``.

    The diagonal is computed without building the Hessian: one-hot
    Hessian-vector products, leaf by leaf (a one-hot column of a leaf needs only
    that leaf's diagonal block), ``chunk_size`` columns per ``vmap``-batched
    product. The cost is one HVP per parameter entry; peak extra memory is
    about ``chunk_size`` times the leaf size. ``chunk_size=None`` picks it
    automatically (see :func:`secorder.estimators.exact.auto_chunk_size`).

    When ``f`` comes from :func:`secorder.functional_loss` and the model
    qualifies, ``engine="auto"`` computes the same diagonal by curvature
    backpropagation, in the time of a few backward passes (see
    :mod:`secorder.structured.hook` for the rules, ``engine=`` and the
    ``last_engine`` attribute).

    Stochastic methods: ``method="hutchinson"`` (Bekas et al. 2007) or ``"xdiag"``
    (Epperly et al. 2024) estimate the diagonal from ``num_samples`` HVPs,
    ``chunk_size`` probes per batched product; ``seed``/``generator``/
    ``distribution``/``rtol``/``atol``/``max_matvecs`` as in :mod:`secorder.stochastic`.
    The result is still a plain pytree; :func:`secorder.hessian_diag_estimate`
    also returns the standard errors and the matvec count.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda p: (p["w"] ** 2).sum() * p["b"].sum()
        >>> d = so.hessian_diag(f)({"w": torch.tensor([1., 2.]), "b": torch.tensor([3.])})
        >>> d["w"], d["b"]
        (tensor([6., 6.]), tensor([0.]))
    """
    options = _checked_options(argnums, chunk_size, method, DIAG_METHODS, engine,
                               num_samples, seed, generator, distribution, rtol, atol, max_matvecs)

    @functools.wraps(f)
    def diag_fn(*args: Any) -> Any:
        problem = _Problem(f, argnums, has_aux, args)
        hit = (_structured.attempt(diag_fn, f, argnums, has_aux, args, engine, "hessian", False, "hessian_diag")
               if method == "exact" else None)
        if hit is not None:
            return hit
        op = _hessian_operator(problem)
        if method == "exact":
            result = tree.unflatten(problem.spec, exact.exact_diagonal(op, chunk_size))
        else:
            result = tree.unflatten(problem.spec, estimate_diagonal(op, method, options, chunk_size).value)
        return (result, problem.aux()) if has_aux else result

    return diag_fn


def trace(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    method: str = "exact",
    engine: str = "auto",
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: str = "rademacher",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Exact Hessian trace transform: ``trace(f)(*args)`` is a 0-dim tensor.

    The sum of the exact diagonal (see :func:`hessian_diag`), accumulated chunk
    by chunk so that the diagonal is never held whole. Differentiable: ``grad``
    of it is a curvature penalty's gradient (third derivatives). ``engine``
    chooses the structured or generic path as in :func:`hessian_diag`.

    Stochastic methods ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` and
    ``"xnystrace"`` (PSD operators only) estimate the trace from ``num_samples``
    HVPs (for the last three ``num_samples`` counts all matvecs; ``"xtrace"`` needs
    it even), ``chunk_size`` probes per batched product, and still return a
    plain 0-dim tensor, so ``vmap`` and ``grad`` compose; options as in
    :mod:`secorder.stochastic`. :func:`secorder.trace_estimate` also returns the
    standard error, matvec count and per-leaf traces.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x, y: ((x * y) ** 2).sum()
        >>> so.trace(f)(torch.tensor([1., 2.]), torch.tensor([3., 4.]))
        tensor(50.)
        >>> g = so.trace(lambda x: (x ** 4).sum() / 12, method="hutchinson", num_samples=8, seed=0)
        >>> g(torch.tensor([1., 2.]))   # diagonal Hessian: Rademacher probes are exact
        tensor(5.)
    """
    options = _checked_options(argnums, chunk_size, method, TRACE_METHODS, engine,
                               num_samples, seed, generator, distribution, rtol, atol, max_matvecs)

    @functools.wraps(f)
    def trace_fn(*args: Any) -> Any:
        problem = _Problem(f, argnums, has_aux, args)
        hit = (_structured.attempt(trace_fn, f, argnums, has_aux, args, engine, "hessian", True, "trace")
               if method == "exact" else None)
        if hit is not None:
            return hit
        if method == "exact":
            result = exact.exact_trace(_hessian_operator(problem), chunk_size)
        else:
            result = estimate_trace(_hessian_operator(problem), method, options, chunk_size).value
        return (result, problem.aux()) if has_aux else result

    return trace_fn


def _hessian_operator(problem: _Problem) -> LeafOperator:
    return hessian_operator(problem.loss_of_leaves, problem.leaves)
