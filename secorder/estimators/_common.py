"""Shared plumbing of the stochastic estimators: argument checks, chunked matvecs,
leaf-block sums and the adaptive sampling loop. No estimator logic lives here."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..operators import LeafOperator
from ..results import STOP_BUDGET, STOP_NUM_SAMPLES, STOP_TOLERANCE, std_error
from .probes import Sampler, check_distribution, make_sampler

# Default probes per vmapped matvec. Every batched matvec re-runs the forward and
# backward pass at the primal point once, so fewer, larger chunks are faster; the
# probe batch is bounded to _PROBE_ENTRIES entries (64 MiB in float32) and to
# _MAX_PROBE_CHUNK probes (each probe also carries batched copies of the model's
# activations, which the entry count cannot see).
_PROBE_ENTRIES = 2**24
_MAX_PROBE_CHUNK = 512
_MIN_PROBE_CHUNK = 16
# An operator that measured its intermediates (LeafOperator.probe_bytes: the largest
# tensor one probe's product allocates) also splits each drawn block of probes into
# matvecs of at most _INTERMEDIATE_BYTES // probe_bytes probes (bounded_operator). On the
# CPU the cost of a large batch is not a slow batching rule but memory: glibc serves
# blocks over its mmap threshold (at most 32 MiB) with fresh pages, so every such
# intermediate is page-faulted in and unmapped again at every op. Measured (issue 26,
# bench_curvatures "cnn N=64", one thread, 60 Hutchinson probes, largest intermediate
# 2.8 MB per probe): the Hessian takes 1.1-1.5 s with 1 to 12 probes per matvec, 2.2 s
# with 13 (36 MB) and 3.4 s with 60; the GGN 0.9-1.3 s up to 8 and 1.9-2.9 s from 16
# to 60 (one 60-probe GGN matvec: 713k minor page faults, against 51k for 8); with
# glibc's mmap threshold raised by environment the GGN trace in one 60-probe batch
# takes 1.3 s, not 2.9 s (the page faults were the cost). The 784-256-256-10 MLP rows take the same time from 8 to
# 60 probes per matvec. Half the threshold leaves room for kernels' workspaces that no
# op returns. Parameter-shaped tensors are not counted (probe_chunk bounds them): on the
# 784-32-10 MLP of bench_estimators, counting its 100 KB weight gradients split 300
# probes in two and took 808 ms against 533 ms for one batch. The probes are still
# drawn in blocks of probe_chunk, so the estimates do not depend on the measured sizes
# (nor on an outer vmap, which enlarges them).
_INTERMEDIATE_BYTES = 2**24


def check_count(value: object, name: str, minimum: int = 1, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{what}, got {value}")
    return value


def check_tolerances(
    rtol: Optional[float], atol: Optional[float], max_matvecs: Optional[int]
) -> bool:
    """Validate ``rtol``/``atol``/``max_matvecs``; True when adaptive stopping is asked for."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            continue
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"{name} must be a non-negative float, got {type(tol).__name__}")
        if not tol >= 0:
            raise ValueError(f"{name} must be a non-negative float, got {tol}")
    adaptive = rtol is not None or atol is not None
    if max_matvecs is not None:
        check_count(max_matvecs, "max_matvecs")
    if adaptive and max_matvecs is None:
        raise ValueError(
            "a tolerance (rtol/atol) needs a matvec budget: pass max_matvecs=<int> so that "
            "sampling stops even if the tolerance is never met"
        )
    if max_matvecs is not None and not adaptive:
        raise ValueError("max_matvecs is the budget of adaptive stopping: pass rtol and/or atol with it")
    return adaptive


def resolve_sampler(
    op: LeafOperator,
    sampler: Optional[Sampler],
    distribution: str,
    generator: Optional[torch.Generator],
    density: float,
) -> Sampler:
    if sampler is not None:
        if not callable(sampler):
            raise TypeError(f"sampler must be callable (k -> list of probe tensors), got {type(sampler).__name__}")
        return sampler
    return make_sampler(op.templates, distribution, generator=generator, density=density)


def probe_chunk(op: LeafOperator, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return check_count(chunk_size, "chunk_size")
    return max(1, min(_MAX_PROBE_CHUNK, max(_MIN_PROBE_CHUNK, _PROBE_ENTRIES // max(op.dim, 1))))


def bounded_operator(op: LeafOperator, chunk_size: Optional[int]) -> LeafOperator:
    """``op`` whose ``matvec`` splits a probe block so one batch's intermediates stay under the budget.

    Applies only to the default chunk (``chunk_size=None``) of an operator that
    measured its intermediates (``op.probe_bytes``); otherwise ``op`` itself. The
    split changes nothing but the batching: the products are those of the whole block.

    Example:
        >>> import torch
        >>> sizes = []
        >>> op = LeafOperator([torch.zeros(3)], lambda V: sizes.append(V[0].shape[0]) or [2 * V[0]], None,
        ...                   probe_bytes=lambda: 2**22)   # 4 MiB per probe: 4 probes per matvec
        >>> _ = bounded_operator(op, None).matvec([torch.ones(10, 3)]); sizes
        [4, 4, 2]
        >>> bounded_operator(op, 10) is op
        True
    """
    if chunk_size is not None or op.probe_bytes is None:
        return op

    def matvec(V: List[Tensor]) -> List[Tensor]:
        nbytes = op.probe_bytes()  # measured when the linearisation is built (None under torch.compile)
        return matvec_chunked(op, list(V), max(1, _INTERMEDIATE_BYTES // nbytes)) if nbytes else op.matvec(V)

    return dataclasses.replace(op, matvec=matvec)


def dtype_of(op: LeafOperator) -> torch.dtype:
    dtype = op.templates[0].dtype
    for t in op.templates[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def leaf_products(V: Sequence[Tensor], W: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``(num_leaves, k)``: per leaf and probe, the inner product of ``V`` and ``W``."""
    return torch.stack([(v * w).reshape(v.shape[0], -1).sum(dim=1).to(dtype) for v, w in zip(V, W)])


def matvec_chunked(op: LeafOperator, V: List[Tensor], chunk: int) -> List[Tensor]:
    """``H V`` for a probe batch, ``chunk`` probes per batched matvec."""
    k = V[0].shape[0]
    if k <= chunk:
        return list(op.matvec(V))
    parts = [op.matvec([v[s : s + chunk] for v in V]) for s in range(0, k, chunk)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(V))]


def to_matrix(V: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """A probe batch (leaf list, leading dim ``k``) as an ``(n, k)`` matrix."""
    k = V[0].shape[0]
    return torch.cat([v.reshape(k, -1).to(dtype) for v in V], dim=1).T


def to_leaves(M: Tensor, templates: Sequence[Tensor]) -> List[Tensor]:
    """Inverse of :func:`to_matrix`: ``(n, k)`` to a leaf list with leading dim ``k``."""
    k = M.shape[1]
    parts = torch.split(M.T, [t.numel() for t in templates], dim=1)
    return [p.reshape((k,) + tuple(t.shape)).to(t.dtype) for p, t in zip(parts, templates)]


def apply_matrix(op: LeafOperator, M: Tensor, chunk: int) -> Tensor:
    """``H M`` for an ``(n, k)`` matrix, evaluated ``chunk`` columns at a time."""
    return to_matrix(matvec_chunked(op, to_leaves(M, op.templates), chunk), M.dtype)


def leaf_row_sums(X: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sum the rows of ``X`` (``(n, ...)``) within each leaf block: ``(num_leaves, ...)``."""
    return torch.stack([part.sum(dim=0) for part in torch.split(X, list(sizes), dim=0)])


def leaf_grams(A: Tensor, B: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per-leaf ``A_L^T B_L`` for ``(n, m)`` matrices: ``(num_leaves, m, m)``."""
    return torch.stack(
        [a.T @ b for a, b in zip(torch.split(A, list(sizes), dim=0), torch.split(B, list(sizes), dim=0))]
    )


def sample_loop(
    step: Callable[[Any, int], Any],
    state: Any,
    first: int,
    chunk: int,
    adaptive: bool,
    rtol: Optional[float],
    atol: Optional[float],
    budget: Optional[int],
    error: Callable[[Any], Tuple[Tensor, Tensor]],
) -> Tuple[Any, int, int]:
    """Draw samples ``chunk`` at a time: ``first`` of them, or adaptively until the tolerance.

    ``step(state, k)`` draws ``k`` samples (one matvec each) and folds them into the
    running ``state``. ``error(state)`` returns ``(stderr, scale)``; the tolerance is
    met when ``stderr <= max(atol, rtol * scale)``. Returns the final state, the
    number of samples drawn and the stop code. Adaptive stopping reads the error back
    to the host once per chunk (a data-dependent decision cannot stay on the device).
    """
    drawn = 0
    target = first if not adaptive else min(first, budget)
    while drawn < target:
        k = min(chunk, target - drawn)
        state = step(state, k)
        drawn += k
    if not adaptive:
        return state, drawn, STOP_NUM_SAMPLES
    while True:
        if drawn >= 2:
            stderr, scale = error(state)
            bound = torch.full_like(scale, float(atol or 0.0))
            if rtol is not None:
                bound = torch.maximum(bound, rtol * scale)
            if bool(stderr <= bound):
                return state, drawn, STOP_TOLERANCE
        if drawn >= budget:
            return state, drawn, STOP_BUDGET
        k = min(chunk, budget - drawn)
        state = step(state, k)
        drawn += k


__all__ = [
    "check_count",
    "check_tolerances",
    "check_distribution",
    "resolve_sampler",
    "probe_chunk",
    "bounded_operator",
    "dtype_of",
    "leaf_products",
    "matvec_chunked",
    "to_matrix",
    "to_leaves",
    "apply_matrix",
    "leaf_row_sums",
    "leaf_grams",
    "sample_loop",
    "std_error",
]
