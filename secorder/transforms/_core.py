"""The one private core of the transform layer: (curvature x quantity x method).

Every quantity transform (``trace``, ``trace_estimate``, ``diagonal``,
``diagonal_estimate`` and their aliases) is :func:`make_request` at creation, which
validates every option once, and :func:`quantity_transform`, whose function runs
:func:`evaluate` on each call:

1. one :class:`~secorder.problem.Problem` for the call (argnums, has_aux, keyword
   arguments, one draw of ``f``'s randomness);
2. the call's generator (``seed`` gives a fresh one, ``generator`` is used,
   neither means the global RNG), made where the method or the curvature is random;
3. for ``method="exact"``, the structured engine when it applies
   (:mod:`secorder.transforms.engine`);
4. otherwise the curvature operator (:func:`secorder.operators.make_operator`;
   the Monte-Carlo Fisher draws its labels here, before any probe) and the
   registered estimator (:mod:`secorder.estimators.registry`).

The products (``hvp``, ``ggn_vp``, ...) share the request validation of
:func:`check_common` and the operator layer, not the estimators.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from .. import _checks, tree
from .. import slow_path as _slow_path
from ..estimators import registry
from ..dataset import is_dataset_loss
from ..estimators.probes import make_generator
from ..modules import FunctionalLoss
from ..operators import Curvature, check_curvature, check_mc_samples, make_operator
from ..operators import _footprint
from ..operators import sharded as _sharded
from ..operators.dataset import call_generator as _dataset_generator
from ..problem import Problem, split_message
from ..explain import Explanation
from ..results import STOP_NUM_SAMPLES, DiagonalEstimate, TraceEstimate, with_engine
from ..transformed import Route, Transformed, signature_of
from . import engine as _engine
from . import hints as _hints
from .. import progress as _progress

__all__ = ["Request", "make_request", "quantity_transform", "evaluate", "check_common", "check_split",
           "eager_under_compile", "call_generator"]


@dataclass(frozen=True)
class Request:
    """A validated (curvature, quantity, method) with its options."""

    curvature: Curvature
    quantity: str
    estimator: registry.Estimator
    options: registry.Options
    argnums: Any
    has_aux: bool
    chunk_size: Optional[int]
    engine: str
    mc_samples: int

    @property
    def random(self) -> bool:
        """Whether a call draws randomness (probes or Fisher labels)."""
        return self.estimator.stochastic or self.curvature.sampled


def check_has_aux(has_aux: Any) -> None:
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {type(has_aux).__name__}")


def check_split(f: Any, curvature: Curvature) -> None:
    """Curvatures built from the model/loss split need ``f`` from ``so.functional_loss`` (checked at creation)."""
    if curvature.needs_split and not isinstance(f.f if is_dataset_loss(f) else f, FunctionalLoss):
        raise TypeError(split_message(curvature.name, f))


def check_common(f: Any, argnums: Any, has_aux: Any, curvature: Any, mc_samples: Any) -> Curvature:
    """Checks shared by every transform: ``f``, ``argnums``, ``has_aux``, ``curvature``, ``mc_samples``."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    _checks.check_argnums(argnums)
    check_has_aux(has_aux)
    entry = check_curvature(curvature)
    check_mc_samples(mc_samples)
    if mc_samples != 1 and not entry.sampled:
        raise ValueError(f"mc_samples applies to curvature='fisher' only, not curvature={entry.name!r}")
    check_split(f, entry)
    return entry


def make_request(
    f: Any,
    quantity: str,
    *,
    argnums: Any,
    curvature: Any,
    method: Any,
    has_aux: Any,
    chunk_size: Any,
    engine: Any,
    mc_samples: Any,
    num_samples: Any,
    seed: Any,
    generator: Any,
    distribution: Any,
    rtol: Any,
    atol: Any,
    max_matvecs: Any,
) -> Request:
    """Validate everything a quantity transform takes, once, when the transform is created."""
    entry = check_common(f, argnums, has_aux, curvature, mc_samples)
    _checks.check_chunk_size(chunk_size)
    _engine.check_engine(engine)
    options = registry.Options(num_samples, seed, generator, distribution, rtol, atol, max_matvecs)
    checked = options
    if entry.sampled:
        # The curvature itself is random: seed/generator apply even to method="exact".
        registry.check_random_source(seed, generator)
        checked = options._replace(seed=None, generator=None)
    estimator = registry.check_options(method, quantity, checked)
    return Request(entry, quantity, estimator, options, argnums, has_aux, chunk_size, engine, mc_samples)


def quantity_transform(request: Request, f: Callable[..., Any], what: str, *, full: bool) -> Transformed:
    """The transformed function: ``fn(*args, **kwargs)`` evaluates ``request`` for one call of ``f``."""

    # one progress bar per call of a data-set loss; hints for the batch dimension and vmap's randomness
    hinted = _hints.per_example_hints(_progress.per_call(f, what)(evaluate))
    run = eager_under_compile(hinted) if request.curvature.needs_split else hinted

    def impl(*args: Any, **kwargs: Any) -> Any:
        return run(request, fn, f, args, kwargs, what, full=full)

    def explain(args: tuple, kwargs: Dict[str, Any]) -> Explanation:
        return explain_request(request, fn.__name__, f, args, kwargs, what)

    fn = Transformed(impl, f, what, signature_of(f), explain)
    return fn


def explain_request(request: Request, name: str, f: Callable[..., Any], args: tuple, kwargs: Dict[str, Any],
                    what: str) -> Explanation:
    """What :func:`evaluate` would do for this call, from the checks only (:func:`secorder.explain`)."""
    problem = Problem(f, request.argnums, request.has_aux, args, kwargs)
    n = sum(t.numel() for t in problem.leaves)
    if request.estimator.stochastic:
        route = Route("generic", f"method={request.estimator.name!r} runs on the curvature operator")
        options = request.options
        adaptive = request.estimator.adaptive and (options.rtol is not None or options.atol is not None)
        num = options.num_samples if options.num_samples is not None else request.estimator.default_samples
        return Explanation(name, route.engine, route.reason, None if adaptive else num, 0)
    with torch.no_grad():
        route = _engine.route(f, request.argnums, request.has_aux, args, kwargs, request.engine,
                              request.curvature.name, request.quantity == "trace", mc_samples=request.mc_samples)
    if route.engine == "structured":
        sweeps: Optional[int] = 1
        if is_dataset_loss(f):
            try:
                sweeps = len(f.data)
            except TypeError:
                sweeps = None
        return Explanation(name, route.engine, route.reason, 0, sweeps)
    # The GGN and both Fishers of a model/loss split have an exact diagonal of their own (loss-factor VJPs,
    # secorder.operators.factor_diagonal, issue 20): no curvature products. Which of its routes runs (and
    # whether a custom loss without a factor falls back to one-hot columns) is known at the call; the
    # call's last_fallback_reason then adds it after this reason.
    own = request.curvature.own_diagonal or request.curvature.needs_split
    return Explanation(name, route.engine, route.reason, 0 if own else n, 0)


def eager_under_compile(fn: Callable) -> Callable:
    """``fn`` run eagerly under ``torch.compile`` (a graph break around it).

    The GGN and Fisher operators take a VJP of a VJP, which dynamo cannot trace yet;
    their transforms still work inside compiled code, without compiling that part.
    """
    return torch.compiler.disable(fn)


def call_generator(options: registry.Options, problem: Problem) -> Optional[torch.Generator]:
    """The call's generator: fresh from ``seed``, the given one, or ``None`` (global RNG).

    For a data-set loss with a process group, the same on every rank
    (:func:`secorder.operators.dataset.call_generator`).
    """
    device = problem.leaves[0].device
    return _dataset_generator(problem.f, make_generator(options.seed, options.generator, device), device)


def evaluate(
    request: Request, fn: Callable, f: Callable[..., Any], args: tuple, kwargs: Dict[str, Any], what: str,
    *, full: bool,
) -> Any:
    """One call of a quantity transform (see the module docstring); sharded parameters are gathered for it."""
    problem = Problem(f, request.argnums, request.has_aux, args, kwargs)
    layout = _sharded.layout_of(f, problem.primals)
    with _sharded.gathered(problem, layout) as problem:
        result = _evaluate(request, fn, problem, what, full=full)
    if layout is None or request.quantity != "diagonal":
        return result
    if full:  # _replace keeps the result's engine
        return result._replace(value=_sharded.export_tree(layout, result.value),
                                stderr=_sharded.export_tree(layout, result.stderr))
    return _sharded.export_tree(layout, result)


def _evaluate(request: Request, fn: Callable, problem: Problem, what: str, *, full: bool) -> Any:
    f, args, kwargs = problem.f, problem.args, problem.kwargs
    generator = call_generator(request.options, problem) if request.random else None
    name = request.curvature.name
    if not request.estimator.stochastic:
        hit = _engine.attempt(
            fn, f, request.argnums, request.has_aux, args, kwargs, request.engine, name,
            request.quantity == "trace" and not full, what, mc_samples=request.mc_samples, generator=generator,
        )
        if hit is not None:
            return _structured_result(request, hit, full)
    else:
        _engine.record(fn, "generic", f"method={request.estimator.name!r} runs on the curvature operator", what)
    # a stochastic estimator's default probe batch is bounded by the operator's measured
    # intermediates (secorder.estimators._common.bounded_operator): its linearisation is
    # built here, measured; nothing else pays for measuring (not the products of a data-set
    # loss's batches, which build one operator per batch and report no size)
    measure = request.estimator.stochastic and request.chunk_size is None and not torch.compiler.is_compiling()
    with _footprint.measuring() if measure else contextlib.nullcontext():
        op = make_operator(request.curvature, problem, mc_samples=request.mc_samples, generator=generator)
        if measure and op.probe_bytes is not None:
            op.probe_bytes()
    with _slow_path.reason(getattr(fn, "last_fallback_reason", None)):
        est = registry.run(op, request.estimator, request.options, request.chunk_size, generator)
    _record_route(fn, op, request, what)
    return problem.result(with_engine(_shape(request, problem, est, full), "generic"))


def _record_route(fn: Callable, op: Any, request: Request, what: str) -> None:
    """Add the route of an operator's own exact diagonal (loss-factor VJPs, ...) to the recorded reason."""
    route = getattr(op.diagonal, "route", None)
    if route is None or request.estimator.stochastic or torch.compiler.is_compiling():
        return
    reason = getattr(fn, "last_fallback_reason", None)
    _engine.record(fn, "generic", f"{reason}; exact diagonal: {route}" if reason else f"exact diagonal: {route}", what)


def _shape(request: Request, problem: Problem, est: Any, full: bool) -> Any:
    """The estimator's flat result laid out like the differentiated argument."""
    spec = problem.spec
    if request.quantity == "trace":
        if not full:
            return est.value
        return est._replace(
            per_leaf=tree.unflatten(spec, list(est.per_leaf.unbind(0))),
            per_leaf_stderr=tree.unflatten(spec, list(est.per_leaf_stderr.unbind(0))),
        )
    value = tree.unflatten(spec, est.value)
    if not full:
        return value
    return est._replace(value=value, stderr=tree.unflatten(spec, est.stderr))


def _structured_result(request: Request, hit: Any, full: bool) -> Any:
    """The structured engine's diagonal (dict) or trace as the transform's result."""
    if not full:
        return hit
    leaves = tree.leaves(hit)
    like = leaves[0] if leaves else hit
    device, dtype = like.device, like.dtype
    exact = dict(
        num_matvecs=torch.tensor(0, dtype=torch.int64, device=device),
        stop=torch.tensor(STOP_NUM_SAMPLES, dtype=torch.int64, device=device),
        dof=torch.tensor(float("inf"), dtype=dtype, device=device),
    )
    if request.quantity == "diagonal":
        return with_engine(DiagonalEstimate(value=hit, stderr=tree.tree_map(torch.zeros_like, hit), **exact),
                           "structured")
    per_leaf = tree.tree_map(lambda d: d.sum(), hit)
    total = sum(tree.leaves(per_leaf), torch.zeros((), dtype=dtype, device=device))
    return with_engine(TraceEstimate(value=total, stderr=torch.zeros_like(total), per_leaf=per_leaf,
                                     per_leaf_stderr=tree.tree_map(torch.zeros_like, per_leaf), **exact), "structured")
