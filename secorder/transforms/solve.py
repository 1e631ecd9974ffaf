"""``so.solve``: inverse-curvature products ``(C + damping I)^-1 v``.

``solve(f, curvature=..., damping=..., method=...)`` validates every option once
and returns ``fn(*args, v)``. Each call builds the curvature operator of that call
(:func:`secorder.operators.make_operator` through
:func:`secorder.transforms.linear_operator.curvature_operator`: one linearisation,
the Fisher's labels drawn once, a :func:`secorder.dataset_loss` summed over its
batches and ranks), folds the damping in, builds the preconditioner
(:mod:`secorder.transforms.preconditioners`) and runs the registered solver
(:mod:`secorder.estimators.solvers`) on all right-hand sides at once: one
batched curvature product per iteration. ``v`` is shaped like ``args[argnums]``,
or has one leading dimension ``k`` on every leaf for ``k`` right-hand sides
solved together.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, tree
from ..estimators import solvers
from ..estimators.registry import check_random_source
from ..problem import Problem
from ..transformed import Transformed, signature_of
from . import preconditioners as _preconditioners
from ._core import check_common
from .linear_operator import CurvatureOperator, check_damping, curvature_operator

__all__ = ["solve", "SolveInfo"]


class SolveInfo(NamedTuple):
    """How a solve went (a pytree of tensors, so it passes through ``torch.func.vmap``).

    Each field but ``num_matvecs`` has shape ``()`` for one right-hand side and ``(k,)`` for ``k``.

    Fields:
        iterations: iterations taken (``int64``).
        residual: the true relative residual ``||v - (C + damping I) x|| / ||v||``
            (0 for ``v = 0``).
        converged: whether ``residual <= tol``.
        num_matvecs: batched curvature products of the whole call (0-dim ``int64``),
            including set-up products and the final residual check.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    num_matvecs: Tensor


def _split_call(args_and_v: tuple) -> Tuple[tuple, Any]:
    if len(args_and_v) < 2:
        raise TypeError("the solve function takes f's arguments followed by the right-hand side v")
    *args, v = args_and_v
    return tuple(args), v


def _rhs_leaves(v: Any, problem: Problem) -> Tuple[List[Tensor], bool]:
    """``v``'s leaves with a leading right-hand-side dim, and whether ``v`` had one (a batch)."""
    got_spec, ref_spec = tree.structure(v), tree.structure(problem.primals)
    if got_spec != ref_spec:
        raise ValueError(f"v must have the pytree structure of the differentiated argument (or that with a leading "
                         f"batch dimension on every leaf): expected {ref_spec}, got {got_spec}")
    leaves = tree.leaves(v)
    paths = tree.paths(v)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"v{path} must be a tensor, got {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(f"v{path} has dtype {leaf.dtype}; a right-hand side must be a real floating-point tensor")
    single = all(leaf.shape == ref.shape for leaf, ref in zip(leaves, problem.leaves))
    if single:
        return [leaf[None] for leaf in leaves], False
    for path, leaf, ref in zip(paths, leaves, problem.leaves):
        if leaf.shape != ref.shape and (leaf.dim() != ref.dim() + 1 or leaf.shape[1:] != ref.shape):
            raise ValueError(f"v{path} has shape {tuple(leaf.shape)}; expected {tuple(ref.shape)} like the "
                             f"differentiated argument, or (k, {', '.join(map(str, ref.shape))}) for k right-hand "
                             "sides")
    counts = {leaf.shape[0] if leaf.dim() == ref.dim() + 1 else None for leaf, ref in zip(leaves, problem.leaves)}
    if len(counts) != 1:
        shapes = ", ".join(f"v{p}: {tuple(leaf.shape)}" for p, leaf in zip(paths, leaves))
        raise ValueError(f"v mixes leaves with and without a leading batch dimension, or batches of different sizes "
                         f"({shapes}): k right-hand sides need the same leading dimension k on every leaf")
    return list(leaves), True


def _progress(enabled: Optional[bool], method: str) -> Tuple[Optional[Callable[[int, Tensor], None]], Any]:
    show = enabled if enabled is not None else sys.stderr.isatty()
    if not show:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"secorder: solve ({method})", unit="it", leave=False, file=sys.stderr)

    def callback(iteration: int, residual: Tensor) -> None:
        bar.update(1)
        bar.set_postfix(residual=f"{float(solvers._common._unwrap(residual).max()):.2e}", refresh=False)

    return callback, bar


def solve(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-6,
    max_iterations: Optional[int] = None,
    preconditioner: Optional[str] = None,
    return_info: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    has_aux: bool = False,
    mc_samples: int = 1,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
    **method_options: Any,
) -> Callable[..., Any]:
    """Inverse-curvature product transform: ``solve(f)(*args, v) = x`` with ``(C + damping I) x = v``.

    ``C`` is the curvature of ``f`` at ``args`` with respect to ``args[argnums]``. The
    solver iterates until the relative residual ``||v - (C + damping I) x|| / ||v||``
    is at most ``tol``, with one batched curvature product per iteration for all
    right-hand sides together, then checks the true residual (one more product).
    If ``tol`` is not met within ``max_iterations`` it warns (a
    :class:`~secorder.estimators.solvers.ConvergenceWarning` with the residual) and
    returns the last iterate; ``return_info=True`` also returns a :class:`SolveInfo`.

    Methods (:mod:`secorder.estimators.solvers`):

    * ``"cg"``: conjugate gradients, for positive definite ``C + damping I`` (a GGN or
      Fisher with damping). A search direction of negative curvature raises
      :class:`~secorder.estimators.solvers.IndefiniteOperatorError` (suggesting
      ``"minres"`` or damping): never a silent wrong ``x``.
    * ``"minres"``: for symmetric indefinite ``C`` (the Hessian); for a singular
      system with ``v`` in the range, the minimum-norm solution ``pinv(C) v``.
    * ``"neumann"``: the truncated Neumann series of LiSSA (Agarwal et al. 2017),
      option ``scale=`` (default: estimated from 20 Lanczos steps).

    Args:
        f: a function returning a scalar (``(scalar, aux)`` with ``has_aux``); for
            curvatures other than ``"hessian"``, built with :func:`secorder.functional_loss`
            (or a :func:`secorder.dataset_loss` of one: every product is a pass over the data).
        argnums: which positional argument(s) to differentiate (int or tuple).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"`` or another
            registered curvature.
        damping: ``lambda`` in ``C + lambda I``, a finite float ``>= 0``.
        method: ``"cg"``, ``"minres"`` or ``"neumann"``.
        tol: the relative residual to reach, a float ``> 0``.
        max_iterations: the iteration budget (default: ``10 n`` for cg and neumann,
            ``5 n`` for minres, ``n`` the number of entries of ``args[argnums]``).
        preconditioner: ``None``, ``"diagonal"`` (Jacobi from the exact diagonal of
            ``C``) or ``"kfac"`` (the K-FAC approximation of ``C``, inverted exactly);
            ``cg`` and ``minres`` only.
        return_info: also return a :class:`SolveInfo`.
        seed: seeds the Fisher's labels and ``neumann``'s scale estimate on every call.
        generator: a ``torch.Generator`` to draw them from instead.
        has_aux: ``f`` returns ``(loss, aux)``; the result is then ``(result, aux)``.
        mc_samples: ``"fisher"`` only: label draws per sample.
        chunk_size: a memory bound (columns per product) for the diagonal preconditioner's
            exact diagonal.
        progress: a tqdm bar over the iterations (default: only on a terminal).
        **method_options: the method's own options (``neumann``: ``scale``).

    Returns:
        ``fn(*args, v, **kwargs)``: ``x`` shaped like ``v`` (one right-hand side shaped
        like ``args[argnums]``, or ``k`` of them with a leading dimension), or
        ``(x, info)`` with ``return_info=True``.

    Example:
        >>> import torch, secorder as so
        >>> A = torch.tensor([[3., 1.], [1., 2.]], dtype=torch.float64)
        >>> f = lambda x: x @ A @ x / 2                      # Hessian A
        >>> x0, v = torch.zeros(2, dtype=torch.float64), torch.tensor([1., 0.], dtype=torch.float64)
        >>> x, info = so.solve(f, damping=1.0, return_info=True)(x0, v)
        >>> torch.allclose(x, torch.linalg.solve(A + torch.eye(2, dtype=torch.float64), v)), bool(info.converged)
        (True, True)
        >>> g = lambda x: (x[0] ** 2 - x[1] ** 2) / 2            # indefinite Hessian diag(1, -1)
        >>> so.solve(g, method="minres")(x0, torch.tensor([[1., 1.], [2., 0.]], dtype=torch.float64)).round(decimals=12)
        tensor([[ 1., -1.],
                [ 2.,  0.]], dtype=torch.float64)
    """
    check_common(f, argnums, has_aux, curvature, mc_samples)
    check_random_source(seed, generator)
    damping = check_damping(damping)
    solver, options = solvers.check_options(method, method_options)
    tol = solvers.registry.check_tol(tol)
    max_iterations = solvers.registry.check_max_iterations(max_iterations)
    precond = _preconditioners.get(preconditioner)
    if precond is not None and solver.name == "neumann":
        raise ValueError(f"preconditioner={preconditioner!r} applies to method='cg' and 'minres', not 'neumann'")
    if not isinstance(return_info, bool):
        raise TypeError(f"return_info must be a bool, got {type(return_info).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    _checks.check_chunk_size(chunk_size)

    def solve_fn(*args_and_v: Any, **kwargs: Any) -> Any:
        args, v = _split_call(args_and_v)
        problem = Problem(f, argnums, has_aux, args, kwargs)
        rhs, batched = _rhs_leaves(v, problem)
        if batched and rhs[0].shape[0] == 0:  # no right-hand sides: nothing to solve
            device = rhs[0].device
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            info = SolveInfo(empty, torch.zeros(0, dtype=rhs[0].dtype, device=device),
                             torch.zeros(0, dtype=torch.bool, device=device), torch.zeros((), dtype=torch.int64,
                                                                                           device=device))
            x_empty = tree.unflatten(problem.spec, [r.clone() for r in rhs])
            return problem.result((x_empty, info) if return_info else x_empty)
        leaf_op, gen = curvature_operator(problem, curvature, mc_samples, seed, generator)
        op = CurvatureOperator(leaf_op, problem.spec, damping=damping)
        flat = op._flat
        B = flat.to_flat(rhs)
        context = _preconditioners.PreconditionerContext(problem, leaf_op, flat.to_flat, flat.to_leaves, curvature,
                                                         damping, mc_samples, gen, chunk_size)
        apply = _preconditioners.build(precond, context)
        callback, bar = _progress(progress, solver.name)
        try:
            out = solvers.run(solver, op.rows, B, tol=tol, max_iterations=max_iterations, options=options,
                              precondition=apply, generator=gen, callback=callback)
        finally:
            if bar is not None:
                bar.close()
        if not solvers._common.host_all(out.converged):
            _warn(out, tol, solver, B.shape[1], B.dtype, max_iterations)
        x = [leaf.to(r.dtype) for leaf, r in zip(flat.to_leaves(out.x), rhs)]
        info = SolveInfo(out.iterations, out.residual, out.converged, out.num_matvecs)
        if not batched:
            x = [leaf[0] for leaf in x]
            info = SolveInfo(info.iterations[0], info.residual[0], info.converged[0], info.num_matvecs)
        x_tree = tree.unflatten(problem.spec, x)
        return problem.result((x_tree, info) if return_info else x_tree)

    return Transformed(solve_fn, f, "solve", signature_of(f, tangent="v"))


def _warn(out: solvers.SolveResult, tol: float, solver: solvers.Solver, n: int, dtype: torch.dtype,
          max_iterations: Optional[int]) -> None:
    residual = solvers._common._unwrap(out.residual).reshape(-1)
    iterations = solvers._common._unwrap(out.iterations).reshape(-1)
    worst = int(residual.argmax())
    r, used = float(residual[worst]), int(iterations[worst])
    budget = max_iterations if max_iterations is not None else max(1, solver.default_iterations(n))
    if used >= budget:
        which = "max_iterations" if max_iterations is not None else "the default max_iterations"
        hint = f"the iteration stopped at {which} ({budget}): raise it, add damping or a preconditioner"
    elif solver.name == "minres":
        hint = ("v has a component outside the range of the (singular) curvature, so no exact solution exists and x "
                "is a least-squares solution: add damping, or project v onto the range")
    else:
        hint = (f"the working precision ({dtype}) limits the attainable residual (the iteration's own residual met "
                "tol): use float64 or a larger tol")
    warnings.warn(
        f"so.solve(method={solver.name!r}) did not reach tol={tol:g}: relative residual {r:.3g} after {used} "
        f"iterations; {hint} (return_info=True gives the residual of every right-hand side)",
        solvers.ConvergenceWarning, stacklevel=3)
