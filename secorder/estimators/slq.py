"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

``num_probes`` random unit probes each start a Lanczos run of ``num_iterations``
steps with partial (default) or full reorthogonalisation
(:mod:`secorder.estimators.reorthogonalization`); the Ritz values and squared first components
of the Ritz vectors of each run are the nodes and weights of a Gauss quadrature
for ``v^T g(H) v`` (see :mod:`secorder.density` for what they estimate).

All runs of a chunk advance together (:class:`secorder.estimators.lanczos.Krylov`):
each Lanczos step is **one** batched matvec over the probe dimension, where
PyHessian's ``density`` and curvlinops' ``lanczos_approximate_spectrum`` loop
over probes one matrix-vector product at a time. Memory: the Krylov bases,
``chunk_size x (num_iterations + 1) x n`` entries in the working dtype (the
default chunk keeps that under 2^27 entries, 512 MiB in float32, and splits the
probes into equal chunks).

References:
    Golub, G. H., Meurant, G. (1994). Matrices, moments and quadrature.
    Ubaru, S., Chen, J., Saad, Y. (2017). Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature. SIAM J. Matrix Anal. Appl. 38(4).
    Ghorbani, B., Krishnan, S., Xiao, Y. (2019). An investigation into neural net
    optimization via Hessian eigenvalue density. ICML.
    Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
    spectra. JMLR 21.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
from torch import Tensor

from ..operators import LeafOperator
from ..density import SpectralDensity
from .lanczos import FlatOperator, Krylov, ritz_pairs
from .probes import check_distribution
from .reorthogonalization import DEFAULT as DEFAULT_REORTHOGONALIZE, check_reorthogonalize

__all__ = ["stochastic_lanczos_quadrature", "check_slq_options", "DEFAULT_NUM_PROBES", "DEFAULT_NUM_ITERATIONS"]

DEFAULT_NUM_PROBES = 10
DEFAULT_NUM_ITERATIONS = 100
# Basis entries per chunk of probes (2^27: 512 MiB in float32).
_BASIS_ENTRIES = 2**27


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_slq_options(num_probes: Any, num_iterations: Any, chunk_size: Any, n: Optional[int] = None) -> None:
    """Validate the options of :func:`stochastic_lanczos_quadrature` (``num_iterations`` against ``n`` when given).

    Example:
        >>> check_slq_options(10, 0, None)
        Traceback (most recent call last):
        ...
        ValueError: num_iterations must be at least 1, got 0
    """
    _check_count(num_probes, "num_probes")
    if num_iterations is not None:
        _check_count(num_iterations, "num_iterations")
    if chunk_size is not None:
        _check_count(chunk_size, "chunk_size")
    if n is not None and num_iterations is not None and num_iterations > n:
        raise ValueError(
            f"num_iterations={num_iterations} is larger than the dimension of the operator ({n}); "
            f"at most {n} Lanczos steps span the whole space"
        )


def _chunks(num_probes: int, chunk_size: int) -> List[int]:
    """Split ``num_probes`` into equal chunks of at most ``chunk_size``."""
    count = math.ceil(num_probes / chunk_size)
    base, extra = divmod(num_probes, count)
    return [base + (i < extra) for i in range(count)]


def stochastic_lanczos_quadrature(
    op: LeafOperator,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_iterations: Optional[int] = None,
    *,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    distribution: str = "rademacher",
    reorthogonalize: str = DEFAULT_REORTHOGONALIZE,
) -> SpectralDensity:
    """The SLQ spectral density of ``op``: ``num_probes`` Lanczos runs advanced together.

    Args:
        op: the symmetric operator.
        num_probes: number of random probes (Lanczos runs).
        num_iterations: Lanczos steps per probe, ``1 <= num_iterations <= n``
            (``None``: ``min(100, n)``); the matvecs are ``num_probes * num_iterations``.
        generator: source of randomness (``None``: the global RNG).
        chunk_size: probes per batched matvec (``None``: all of them, unless their
            bases would exceed 2^27 entries).
        distribution: of the probes before normalisation, as in
            :mod:`secorder.estimators.probes` (``"rademacher"`` by default).
        reorthogonalize: ``"partial"`` (default: Simon 1984, the basis kept
            semi-orthogonal, ``|q_i^T q_k| <= sqrt(eps)``, which keeps the nodes and
            weights as accurate as full reorthogonalisation does; one host
            synchronisation per step, ``"full"`` under ``vmap``) or ``"full"``; see
            :mod:`secorder.estimators.reorthogonalization`.

    Returns:
        A :class:`~secorder.density.SpectralDensity`.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> A = torch.diag(torch.tensor([1., 1., 2., 4.], dtype=torch.float64))
        >>> op = LeafOperator([torch.zeros(4, dtype=torch.float64)], lambda V: [V[0] @ A], None)
        >>> d = stochastic_lanczos_quadrature(op, 3, 4, generator=torch.Generator().manual_seed(0))
        >>> d.num_steps                       # three distinct eigenvalues: breakdown after 3 steps
        tensor([3, 3, 3])
        >>> round(d.moment(1).item(), 12), round(d.trace().item(), 12)   # Rademacher on a diagonal: exact
        (2.0, 8.0)
    """
    flat = FlatOperator(op)
    n = flat.dim
    check_slq_options(num_probes, num_iterations, chunk_size, n)
    check_distribution(distribution)
    check_reorthogonalize(reorthogonalize)
    m = min(DEFAULT_NUM_ITERATIONS, n) if num_iterations is None else num_iterations
    if chunk_size is None:
        chunk_size = max(1, _BASIS_ENTRIES // ((m + 1) * n))
    # All probes are drawn first, so that the result does not depend on the chunking.
    starts = flat.draw(num_probes, distribution, generator)
    spares = flat.randn(num_probes, generator)
    nodes, weights, steps = [], [], []
    first = 0
    buffer = None  # one basis' memory for every chunk (fresh memory costs page faults)
    for size in _chunks(num_probes, min(chunk_size, num_probes)):
        K = Krylov(flat, starts[first : first + size], m, spares[first : first + size], space=flat.space,
                   reorthogonalize=reorthogonalize, buffer=buffer)
        first += size
        K.extend(m)
        buffer = K.buffer
        theta, Y = ritz_pairs(K.projected())
        nodes.append(theta)
        weights.append(Y[:, 0, :] ** 2)
        steps.append(K.steps_until_breakdown())
    device = flat.device
    return SpectralDensity(
        nodes=torch.cat(nodes),
        weights=torch.cat(weights),
        dim=torch.tensor(n, dtype=torch.int64, device=device),
        num_matvecs=torch.tensor(flat.num_matvecs, dtype=torch.int64, device=device),
        num_steps=torch.cat(steps),
    )
