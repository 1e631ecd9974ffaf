"""Stochastic-method options of the transforms, and their dispatch to the estimators.

The transforms (:func:`secorder.trace`, :func:`secorder.hessian_diag`,
:func:`secorder.trace_estimate`, :func:`secorder.hessian_diag_estimate`) accept
``method=`` and the keyword options collected in :class:`StochasticOptions`. They
are validated once, when the transform is created, and turned into an estimator
call on every call of the transformed function.

Randomness: ``seed=`` seeds a fresh ``torch.Generator`` (on the device of the
differentiated argument) on every call, so the same seed gives the same result
bit for bit; ``generator=`` is used and advanced; with neither, the global RNG
draws fresh probes on every call, and ``torch.func.vmap(..., randomness="different")``
gives each batch element its own probes (``randomness="same"`` shares them).

Example:
    >>> opts = StochasticOptions(num_samples=10, seed=0)
    >>> check_options("hutchinson", opts, TRACE_METHODS)
    >>> check_options("xtrace", StochasticOptions(num_samples=9), TRACE_METHODS)
    Traceback (most recent call last):
    ...
    ValueError: method='xtrace' needs an even num_samples (half the matvecs sketch A Omega, half compute A Q), got 9; use 8 or 10
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .estimators.hutchinson import hutchinson_trace
from .estimators.hutchinson_diag import hutchinson_diagonal
from .estimators.hutchpp import hutchpp_trace
from .estimators.xtrace import xdiag, xnystrace, xtrace
from .estimators._common import check_count, check_tolerances
from .estimators.probes import check_distribution, make_generator
from .operators import LeafOperator
from .results import DiagonalEstimate, TraceEstimate

__all__ = ["TRACE_METHODS", "DIAG_METHODS", "StochasticOptions", "check_options", "estimate_trace", "estimate_diagonal"]

TRACE_METHODS: Tuple[str, ...] = ("hutchinson", "hutch++", "xtrace", "xnystrace")
DIAG_METHODS: Tuple[str, ...] = ("hutchinson", "xdiag")
_ADAPTIVE = ("hutchinson", "hutch++")
_DEFAULT_SAMPLES = {"hutchinson": 100, "hutch++": 99, "xtrace": 100, "xnystrace": 100, "xdiag": 100}
_MIN_SAMPLES = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "xnystrace": 2, "xdiag": 4}
_EVEN = ("xtrace", "xdiag")


class StochasticOptions(NamedTuple):
    """The stochastic-method keyword options of the transforms (see the module docstring)."""

    num_samples: Optional[int] = None
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    distribution: str = "rademacher"
    rtol: Optional[float] = None
    atol: Optional[float] = None
    max_matvecs: Optional[int] = None

    def is_default(self) -> bool:
        return self == StochasticOptions()


def check_options(method: str, options: StochasticOptions, valid: Tuple[str, ...]) -> None:
    """Validate the options for a stochastic ``method`` (``"exact"`` accepts none of them)."""
    if method == "exact":
        if not options.is_default():
            given = [k for k, v in options._asdict().items() if v != getattr(StochasticOptions(), k)]
            raise ValueError(
                f"{', '.join(given)} only apply to the stochastic methods ({', '.join(map(repr, valid))}); "
                "method='exact' takes none of them"
            )
        return
    if options.num_samples is not None:
        check_count(options.num_samples, "num_samples", _MIN_SAMPLES[method], f" for method={method!r}")
        if method in _EVEN and options.num_samples % 2:
            n = options.num_samples
            raise ValueError(
                f"method={method!r} needs an even num_samples (half the matvecs sketch A Omega, half "
                f"compute A Q), got {n}; use {n - 1} or {n + 1}"
            )
    if options.seed is not None and options.generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if options.seed is not None and (isinstance(options.seed, bool) or not isinstance(options.seed, int)):
        raise TypeError(f"seed must be an int, got {type(options.seed).__name__}")
    if options.generator is not None and not isinstance(options.generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(options.generator).__name__}")
    check_distribution(options.distribution)
    adaptive = check_tolerances(options.rtol, options.atol, options.max_matvecs)
    if adaptive and method not in _ADAPTIVE:
        raise ValueError(
            f"rtol/atol/max_matvecs (adaptive stopping) are supported by methods {', '.join(map(repr, _ADAPTIVE))}, "
            f"not method={method!r}; pass num_samples instead"
        )


def _common_kwargs(op: LeafOperator, method: str, options: StochasticOptions, chunk_size: Optional[int]) -> dict:
    generator = make_generator(options.seed, options.generator, op.templates[0].device)
    kwargs = dict(distribution=options.distribution, generator=generator, chunk_size=chunk_size)
    if method in _ADAPTIVE:
        kwargs.update(rtol=options.rtol, atol=options.atol, max_matvecs=options.max_matvecs)
    return kwargs


def estimate_trace(
    op: LeafOperator, method: str, options: StochasticOptions, chunk_size: Optional[int] = None
) -> TraceEstimate:
    """Run the trace estimator ``method`` on ``op`` with validated ``options``.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> op = LeafOperator([torch.zeros(3)], lambda V: [2 * V[0]], None)
        >>> estimate_trace(op, "hutchinson", StochasticOptions(num_samples=4, seed=0)).value
        tensor(6.)
    """
    num = options.num_samples if options.num_samples is not None else _DEFAULT_SAMPLES[method]
    kwargs = _common_kwargs(op, method, options, chunk_size)
    fn = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace, "xnystrace": xnystrace}[method]
    return fn(op, num, **kwargs)


def estimate_diagonal(
    op: LeafOperator, method: str, options: StochasticOptions, chunk_size: Optional[int] = None
) -> DiagonalEstimate:
    """Run the diagonal estimator ``method`` on ``op`` with validated ``options``.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> op = LeafOperator([torch.zeros(3)], lambda V: [2 * V[0]], None)
        >>> estimate_diagonal(op, "hutchinson", StochasticOptions(num_samples=4, seed=0)).value
        [tensor([2., 2., 2.])]
    """
    num = options.num_samples if options.num_samples is not None else _DEFAULT_SAMPLES[method]
    kwargs = _common_kwargs(op, method, options, chunk_size)
    fn = {"hutchinson": hutchinson_diagonal, "xdiag": xdiag}[method]
    return fn(op, num, **kwargs)
