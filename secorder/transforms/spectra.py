"""Spectra of any curvature: ``so.eigenvalues`` and ``so.spectral_density``.

Both are transforms: they take ``f`` and return a function of ``f``'s arguments.
Each call builds the curvature operator of that call
(:func:`secorder.operators.make_operator`: the Hessian, the generalised
Gauss-Newton, the Monte-Carlo Fisher or the empirical Fisher, one linearisation
reused by every product) and runs Lanczos on it, the basis kept semi-orthogonal by
partial reorthogonalisation (Simon 1984) unless ``reorthogonalize="full"`` asks for
full reorthogonalisation (:mod:`secorder.estimators.reorthogonalization`):

* :func:`eigenvalues`: the ``k`` largest, smallest or largest-magnitude
  eigenvalues, and optionally their eigenvectors, thick-restarted until the
  residuals reach ``tol`` or for a fixed ``num_iterations``
  (:mod:`secorder.estimators.eigen`);
* :func:`spectral_density`: stochastic Lanczos quadrature, all probes advancing
  through one batched matvec per step (:mod:`secorder.estimators.slq`), returned
  as a :class:`~secorder.density.SpectralDensity`.

``per_leaf=True`` runs them on each leaf's diagonal block instead (for a model's
params dict: one spectrum per layer weight and bias), through the operator's
block products, in one call.

Randomness: ``seed=`` gives the same result on every call; ``generator=`` is used
and advanced; with neither, the global RNG. The start vectors are random, so under
``torch.func.vmap`` pass ``randomness="same"`` (every batch element starts from the
same vectors) or ``"different"``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import _checks, tree
from ..density import SpectralDensity
from ..estimators.eigen import check_eigen_options, lanczos_eigenpairs
from ..estimators.lanczos import block_operator, working_dtype
from ..estimators.probes import make_generator
from ..estimators.registry import check_random_source
from ..estimators.reorthogonalization import DEFAULT as DEFAULT_REORTHOGONALIZE, check_reorthogonalize
from ..estimators.slq import DEFAULT_NUM_ITERATIONS, DEFAULT_NUM_PROBES, check_slq_options
from ..estimators.slq import stochastic_lanczos_quadrature
from ..operators import make_operator
from ..operators import sharded as _sharded
from ..operators.dataset import call_generator
from ..problem import Problem
from ..results import with_engine
from ..transformed import Transformed, signature_of
from ._core import check_common
from .hints import per_example_hints
from ..progress import per_call

__all__ = ["eigenvalues", "spectral_density"]

_VMAP_HINT = (
    "so.eigenvalues in its adaptive mode (num_iterations=None, or tol given) decides when to stop on the host "
    "after every Lanczos step, which cannot run under torch.func.vmap; pass num_iterations=<int> without tol "
    "for a fixed number of steps"
)


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _prologue(f: Any, argnums: Any, has_aux: Any, curvature: Any, mc_samples: Any, seed: Any, generator: Any,
              **flags: Any) -> None:
    """The checks every transform shares (:func:`secorder.transforms._core.check_common`), then ours."""
    check_common(f, argnums, has_aux, curvature, mc_samples)
    check_random_source(seed, generator)
    for name, value in flags.items():
        _check_flag(value, name)


def _setup(problem: Problem, curvature: str, mc_samples: int, seed: Optional[int],
           generator: Optional[torch.Generator]):
    device = problem.leaves[0].device
    # A data-set loss with a process group: the same generator on every rank.
    gen = call_generator(problem.f, make_generator(seed, generator, device), device)
    # The Monte-Carlo Fisher draws its labels when the operator is made, before the probes.
    return make_operator(curvature, problem, mc_samples=mc_samples, generator=gen), gen


def _empty_density(template: torch.Tensor, num_probes: int) -> SpectralDensity:
    empty = template.new_zeros((num_probes, 0), dtype=working_dtype([template]))
    count = torch.zeros((), dtype=torch.int64, device=template.device)
    return SpectralDensity(empty, empty, count, count, torch.zeros(num_probes, dtype=torch.int64,
                                                                  device=template.device))


def eigenvalues(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    k: int = 1,
    which: str = "largest",
    curvature: str = "hessian",
    num_iterations: Optional[int] = None,
    tol: Optional[float] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_eigenvectors: bool = False,
    per_leaf: bool = False,
    has_aux: bool = False,
    mc_samples: int = 1,
    reorthogonalize: str = DEFAULT_REORTHOGONALIZE,
) -> Callable[..., Any]:
    """Extreme eigenvalues of a curvature matrix: ``eigenvalues(f)(*args)`` is a ``(k,)`` tensor.

    Lanczos on the curvature operator of ``f`` at ``args`` with respect to
    ``args[argnums]`` (see :mod:`secorder.estimators.eigen`). With
    ``num_iterations=None`` it steps until every returned eigenpair has a residual
    ``||H u - lambda u|| <= tol * ||H||`` (``||H||`` estimated by the largest Ritz
    value in magnitude), so every returned eigenvalue is within ``tol * ||H||`` of an
    eigenvalue (guaranteed), and within about ``tol^2 ||H||^2 / gap`` once it is
    separated from the rest of the spectrum by ``gap`` (Parlett 1998, ch. 11): ask
    for the accuracy you need, ``tol=1e-3`` for ``1e-3 ||H||``. For the largest
    Hessian eigenvalues the start vector is a random one plus the gradient, which lies
    mostly in the top eigenspace (Gur-Ari et al. 2018), so fewer steps reach ``tol``. The Krylov basis
    holds at most ``max(2 k + 10, 30)`` vectors (thick restarts beyond that). With
    ``num_iterations=m`` alone it takes exactly ``m`` steps (``m`` matvecs, memory
    ``(m + 1) x n``) and stops on nothing, so it composes with ``torch.func.vmap``
    (for example per-example top eigenvalues; there the reorthogonalisation is full,
    since partial reorthogonalisation decides on the host). A Krylov
    breakdown (an invariant subspace found early) is not an error: its eigenvalues
    are exact and the run continues in the orthogonal complement, which is also how
    repeated eigenvalues are found with their multiplicity.

    Args:
        f: a function returning a scalar (``(scalar, aux)`` with ``has_aux``); for
            ``curvature`` other than ``"hessian"``, built with
            :func:`secorder.functional_loss`.
        argnums: which positional argument(s) to differentiate (int or tuple).
        k: how many eigenvalues, between 1 and the number of entries of ``args[argnums]``.
        which: ``"largest"`` (algebraic, descending), ``"smallest"`` (algebraic,
            ascending) or ``"magnitude"`` (descending absolute value).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        num_iterations: alone, a fixed number of Lanczos steps, ``k <= num_iterations <= n``
            (composes with ``vmap``); with ``tol``, the most steps the adaptive run takes
            (as SciPy's ``eigsh(maxiter=, tol=)`` and PyHessian's ``eigenvalues(maxIter=,
            tol=)``; a ``RuntimeWarning`` when ``tol`` is not reached within them);
            ``None`` (default): adaptive, to ``tol``.
        tol: the relative residual of the adaptive mode (default ``1e-4``), which bounds
            the eigenvalue error by ``tol * ||H||``; given, the run is adaptive.
        seed: seeds the random start vector (and the Fisher's labels) on every call.
        generator: a ``torch.Generator`` to draw them from instead (advanced).
        return_eigenvectors: also return the eigenvectors, a pytree shaped like
            ``args[argnums]`` with a leading ``k`` dimension, unit norm over all
            leaves and mutually orthogonal.
        per_leaf: the eigenvalues of each leaf's diagonal block instead (one call,
            block products): a pytree like ``args[argnums]`` of ``(k,)`` tensors (a leaf
            with fewer than ``k`` entries gives all of its eigenvalues; ``num_iterations``
            is capped at the leaf's size); eigenvectors per leaf, shaped ``(k, *leaf.shape)``.
        has_aux: ``f`` returns ``(loss, aux)``; the result is then ``(result, aux)``.
        mc_samples: ``"fisher"`` only: label draws per sample.
        reorthogonalize: ``"partial"`` (default; Simon 1984: a pass against the basis
            only when the estimated loss of orthogonality exceeds ``sqrt(eps)``) or
            ``"full"`` (every step); see :mod:`secorder.estimators.reorthogonalization`.

    Returns:
        A function of ``f``'s arguments returning the eigenvalues, or
        ``(eigenvalues, eigenvectors)`` with ``return_eigenvectors=True``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: 2.5 * x[0] ** 2 + 1.5 * x[1] ** 2 + 0.5 * x[2] ** 2 - x[3] ** 2
        >>> x = torch.zeros(4, dtype=torch.float64)
        >>> so.eigenvalues(f, k=2, seed=0)(x).round(decimals=10)   # Hessian diag(5, 3, 1, -2)
        tensor([5., 3.], dtype=torch.float64)
        >>> so.eigenvalues(f, which="smallest", seed=0)(x).round(decimals=10)
        tensor([-2.], dtype=torch.float64)
        >>> values, vectors = so.eigenvalues(f, return_eigenvectors=True, seed=0)(x)
        >>> vectors.abs().round(decimals=6)
        tensor([[1., 0., 0., 0.]], dtype=torch.float64)
    """
    _prologue(f, argnums, has_aux, curvature, mc_samples, seed, generator,
              return_eigenvectors=return_eigenvectors, per_leaf=per_leaf)
    check_eigen_options(k, which, num_iterations, tol)
    check_reorthogonalize(reorthogonalize)

    @per_example_hints
    @per_call(f, "eigenvalues")
    def eigenvalues_fn(*args: Any, **kwargs: Any) -> Any:
        problem = Problem(f, argnums, has_aux, args, kwargs)
        layout = _sharded.layout_of(f, problem.primals)
        with _sharded.gathered(problem, layout) as problem:
            return _eigenvalues(problem, layout)

    def _eigenvalues(problem: Problem, layout: Any) -> Any:
        op, gen = _setup(problem, curvature, mc_samples, seed, generator)
        if layout is not None and not per_leaf:  # the Krylov basis held in shards like the parameters
            op = _sharded.sharded_view(op, layout)

        def solve(o, kk: int, m: Optional[int]):
            return with_engine(lanczos_eigenpairs(o, kk, which, num_iterations=m, tol=tol, generator=gen,
                                                  return_eigenvectors=return_eigenvectors,
                                                  reorthogonalize=reorthogonalize), "generic")

        try:
            if per_leaf:
                sizes = [t.numel() for t in op.templates]
                if k > max(sizes):
                    raise ValueError(f"k={k} is larger than every leaf (the largest has {max(sizes)} entries)")
                values_list, vectors_list = [], []
                for i, (s, t) in enumerate(zip(sizes, op.templates)):
                    if s == 0:  # an empty leaf has no eigenvalues
                        values_list.append(t.new_empty(0))
                        vectors_list.append(t.new_empty((0,) + tuple(t.shape)))
                        continue
                    m = None if num_iterations is None else min(num_iterations, s)
                    r = solve(block_operator(op, i), min(k, s), m)
                    values_list.append(r.eigenvalues)
                    vectors_list.append(r.eigenvectors[0] if return_eigenvectors else None)
                values = tree.unflatten(problem.spec, values_list)
                vectors = tree.unflatten(problem.spec, vectors_list) if return_eigenvectors else None
                vectors = _sharded.export_tree(layout, vectors, lead=1)
            else:
                res = solve(op, k, num_iterations)
                values = res.eigenvalues
                vectors = None
                if return_eigenvectors:
                    pieces = res.eigenvectors
                    if layout is not None:  # this rank's rows of each eigenvector, as shards
                        pieces = [layout.wrap(i, piece, (piece.shape[0],) + layout.shapes[i], lead=1)
                                  for i, piece in enumerate(pieces)]
                    vectors = tree.unflatten(problem.spec, pieces)
        except RuntimeError as err:
            if (num_iterations is None or tol is not None) and "data-dependent control flow" in str(err):
                raise RuntimeError(_VMAP_HINT) from err
            raise
        return problem.result((values, vectors) if return_eigenvectors else values)

    return Transformed(eigenvalues_fn, f, "eigenvalues", signature_of(f))


def spectral_density(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    num_probes: int = DEFAULT_NUM_PROBES,
    num_iterations: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    per_leaf: bool = False,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    mc_samples: int = 1,
    reorthogonalize: str = DEFAULT_REORTHOGONALIZE,
) -> Callable[..., Any]:
    """Eigenvalue density of a curvature matrix by stochastic Lanczos quadrature.

    ``spectral_density(f)(*args)`` is a :class:`~secorder.density.SpectralDensity`:
    the quadrature nodes and weights of ``num_probes`` Lanczos runs of
    ``num_iterations`` steps from random Rademacher unit probes, with partial
    (default) or full reorthogonalisation (see :mod:`secorder.estimators.slq`). All runs of a chunk
    advance together, one batched matvec per step; memory is
    ``chunk_size x (num_iterations + 1) x n`` entries for the Krylov bases. Its
    :meth:`~secorder.density.SpectralDensity.moment` ``(p)`` estimates
    ``tr(H^p) / n`` (unbiased for ``p <= 2 num_iterations - 1``; ``n`` times the first
    moment is Hutchinson's trace estimate from the same probes),
    :meth:`~secorder.density.SpectralDensity.density` evaluates the
    Gaussian-smoothed density on a grid and
    :meth:`~secorder.density.SpectralDensity.plot` draws it. The number of
    steps is fixed, so it composes with ``torch.func.vmap``
    (``randomness="same"`` or ``"different"``).

    Args:
        f: a function returning a scalar (``(scalar, aux)`` with ``has_aux``); for
            ``curvature`` other than ``"hessian"``, built with
            :func:`secorder.functional_loss`.
        argnums: which positional argument(s) to differentiate (int or tuple).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        num_probes: Lanczos runs (random probes), at least 1 (default 10).
        num_iterations: Lanczos steps per run, between 1 and ``n`` (default
            ``min(100, n)``); matvecs are ``num_probes * num_iterations``.
        seed: seeds the probes (and the Fisher's labels) on every call.
        generator: a ``torch.Generator`` to draw them from instead (advanced).
        per_leaf: the density of each leaf's diagonal block instead: a pytree like
            ``args[argnums]`` of ``SpectralDensity`` (``num_iterations`` capped at each
            leaf's size).
        has_aux: ``f`` returns ``(loss, aux)``; the result is then ``(density, aux)``.
        chunk_size: probes per batched matvec (default: all of them, unless their
            Krylov bases would exceed 2^27 entries).
        mc_samples: ``"fisher"`` only: label draws per sample.
        reorthogonalize: ``"partial"`` (default, Simon 1984; ``"full"`` under ``vmap``)
            or ``"full"``; see :mod:`secorder.estimators.reorthogonalization`.

    Returns:
        A function of ``f``'s arguments returning a ``SpectralDensity`` (or a pytree of them).

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (torch.arange(1., 5.) * x ** 2).sum() / 2   # Hessian diag(1, 2, 3, 4)
        >>> d = so.spectral_density(f, num_probes=3, num_iterations=4, seed=0)(torch.zeros(4))
        >>> d.nodes.shape, round(d.moment(1).item(), 4), round(d.trace().item(), 4)
        (torch.Size([3, 4]), 2.5, 10.0)
        >>> grid = torch.linspace(0., 5., 6)
        >>> d.density(grid, sigma=0.1).round(decimals=3)
        tensor([0.0000, 0.9970, 0.9970, 0.9970, 0.9970, 0.0000])
    """
    _prologue(f, argnums, has_aux, curvature, mc_samples, seed, generator, per_leaf=per_leaf)
    check_slq_options(num_probes, num_iterations, chunk_size)
    check_reorthogonalize(reorthogonalize)

    @per_example_hints
    @per_call(f, "spectral density")
    def spectral_density_fn(*args: Any, **kwargs: Any) -> Any:
        problem = Problem(f, argnums, has_aux, args, kwargs)
        layout = _sharded.layout_of(f, problem.primals)
        with _sharded.gathered(problem, layout) as problem:
            return _density(problem, layout)

    def _density(problem: Problem, layout: Any) -> Any:
        op, gen = _setup(problem, curvature, mc_samples, seed, generator)
        if layout is not None and not per_leaf:  # the Krylov bases held in shards like the parameters
            op = _sharded.sharded_view(op, layout)

        def run(o, m: Optional[int]) -> SpectralDensity:
            return with_engine(stochastic_lanczos_quadrature(o, num_probes, m, generator=gen, chunk_size=chunk_size,
                                                             reorthogonalize=reorthogonalize), "generic")

        if per_leaf:
            densities = []
            for i, t in enumerate(op.templates):
                if t.numel() == 0:  # an empty leaf: no nodes
                    densities.append(_empty_density(t, num_probes))
                    continue
                m = min(DEFAULT_NUM_ITERATIONS if num_iterations is None else num_iterations, t.numel())
                densities.append(run(block_operator(op, i), m))
            result: Any = tree.unflatten(problem.spec, densities)
        else:
            result = run(op, num_iterations)
        return problem.result(result)

    return Transformed(spectral_density_fn, f, "spectral_density", signature_of(f))
