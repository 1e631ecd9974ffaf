"""The estimator registry: every method declares itself once, everything else reads it.

An :class:`Estimator` says what a ``method=`` is: its name, the quantity it
estimates (``"trace"`` or ``"diagonal"``), the function that runs it, its default
and minimum ``num_samples``, whether ``num_samples`` must be even, whether it
supports adaptive stopping (``rtol``/``atol``/``max_matvecs``), whether it needs a
positive semi-definite operator, how its error bar is made and its citation. Each
estimator module registers its methods when it is imported
(:mod:`secorder.estimators` imports them all); the transforms validate options
with :func:`check_options` and run a method with :func:`run`, the command line's
``--method`` choices are :func:`names` and the docs' method table is
:func:`table`. A new estimator is one module with one :func:`register` call.

Options: the stochastic keyword options of the transforms are an :class:`Options`
(``num_samples``, ``seed``, ``generator``, ``distribution``, ``rtol``, ``atol``,
``max_matvecs``); ``distribution=None`` means the method's own default test vectors
(Rademacher for Hutchinson, normal for the deflating methods, whose intervals
under-cover with Rademacher or sphere vectors on operators close to a multiple of
the identity at small budgets). Randomness: ``seed=`` seeds a fresh ``torch.Generator`` (on the
device of the differentiated argument) on every call, so the same seed gives the
same result bit for bit; ``generator=`` is used and advanced; with neither, the
global RNG draws fresh probes on every call, and
``torch.func.vmap(..., randomness="different")`` gives each batch element its own
probes (``randomness="same"`` shares them).

Example:
    >>> names("trace")
    ('exact', 'hutchinson', 'hutch++', 'xtrace', 'xnystrace')
    >>> check_options("xtrace", "trace", Options(num_samples=9))
    Traceback (most recent call last):
    ...
    ValueError: method='xtrace' needs an even num_samples (half the matvecs sketch A Omega, half compute A Q), got 9; use 8 or 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..operators import LeafOperator
from ..registry import Registry
from ._common import check_count, check_tolerances
from .probes import check_distribution, check_seed

__all__ = ["Estimator", "Options", "QUANTITIES", "ESTIMATORS", "register", "get", "names", "estimators", "check_options",
           "check_num_samples", "max_samples", "check_seed", "check_random_source", "run", "table"]

QUANTITIES = ("trace", "diagonal")

@dataclass(frozen=True)
class Estimator:
    """One ``method=`` for one quantity.

    Fields:
        name: the ``method=`` value.
        quantity: ``"trace"`` or ``"diagonal"``.
        fn: ``fn(op, num_samples, *, distribution, generator, chunk_size[, rtol, atol,
            max_matvecs])`` returning a :class:`~secorder.results.TraceEstimate` /
            :class:`~secorder.results.DiagonalEstimate`; for ``exact``,
            ``fn(op, chunk_size)``.
        default_samples: ``num_samples`` when none is given (``None``: not sampled).
        min_samples: the smallest ``num_samples`` accepted.
        even: ``num_samples`` must be even.
        even_reason: why (shown in the error).
        adaptive: supports ``rtol``/``atol``/``max_matvecs``.
        max_per_dim: ``num_samples`` is at most this many times the operator's
            dimension (``None``: no limit); see :func:`max_samples`.
        default_distribution: the test-vector distribution when ``distribution`` is not
            given (the one its error bar's coverage was checked with, see
            ``benchmarks/coverage_intervals.py``).
        psd_only: meant for positive semi-definite operators only.
        error_bar: how ``stderr`` and its degrees of freedom are made (for the docs).
        citation: the source.
        summary: one line for the docs.
    """

    name: str
    quantity: str
    fn: Callable[..., Any]
    default_samples: Optional[int] = None
    min_samples: int = 1
    even: bool = False
    even_reason: str = ""
    adaptive: bool = False
    max_per_dim: Optional[int] = None
    default_distribution: str = "rademacher"
    psd_only: bool = False
    error_bar: str = ""
    citation: str = ""
    summary: str = ""

    @property
    def stochastic(self) -> bool:
        return self.default_samples is not None


class Options(NamedTuple):
    """The stochastic-method keyword options of the transforms (see the module docstring)."""

    num_samples: Optional[int] = None
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    distribution: Optional[str] = None  # None: the method's default_distribution
    rtol: Optional[float] = None
    atol: Optional[float] = None
    max_matvecs: Optional[int] = None

    def given(self) -> List[str]:
        """The names of the options that differ from their defaults."""
        default = Options()
        return [k for k, v in self._asdict().items() if v is not getattr(default, k) and v != getattr(default, k)]


def _describe_key(key: Any) -> str:
    return f"{key[0]!r} for the {key[1]}" if isinstance(key, tuple) and len(key) == 2 else repr(key)


ESTIMATORS: Registry = Registry("method", describe=_describe_key)  # {(name, quantity): Estimator}


def register(estimator: Estimator, *, replace: bool = False) -> None:
    """Add ``estimator`` (its ``(name, quantity)`` must be new, unless ``replace=True``).

    Example:
        >>> register(get("hutchinson", "trace"))
        Traceback (most recent call last):
        ...
        ValueError: method 'hutchinson' for the trace is already registered; pass replace=True to replace it
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a secorder.estimators.registry.Estimator, got {type(estimator).__name__}")
    if estimator.quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {estimator.quantity!r}")
    ESTIMATORS.register((estimator.name, estimator.quantity), estimator, replace=replace)


def estimators(quantity: str) -> List[Estimator]:
    """The registered estimators of ``quantity``, ``exact`` first, then in registration order."""
    found = [e for (_, q), e in ESTIMATORS.items() if q == quantity]
    return sorted(found, key=lambda e: e.stochastic)


def names(quantity: str, *, stochastic_only: bool = False) -> Tuple[str, ...]:
    """The ``method=`` values for ``quantity`` (``"trace"`` or ``"diagonal"``).

    Example:
        >>> names("diagonal"), names("diagonal", stochastic_only=True)
        (('exact', 'hutchinson', 'xdiag'), ('hutchinson', 'xdiag'))
    """
    return tuple(e.name for e in estimators(quantity) if e.stochastic or not stochastic_only)


def get(method: Any, quantity: str) -> Estimator:
    """The estimator ``method`` of ``quantity``, or a ``ValueError`` listing the valid ones.

    Example:
        >>> get("magic", "trace")
        Traceback (most recent call last):
        ...
        ValueError: unknown method 'magic'; valid methods are 'exact', 'hutchinson', 'hutch++', 'xtrace', 'xnystrace'
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    found = ESTIMATORS.lookup((method, quantity))
    if found is None:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(map(repr, names(quantity)))}")
    return found


def check_num_samples(estimator: Estimator, num_samples: Any) -> int:
    """``num_samples`` for ``estimator``: an int, even where it must be, at least its minimum.

    Example:
        >>> check_num_samples(get("xtrace", "trace"), 5)
        Traceback (most recent call last):
        ...
        ValueError: method='xtrace' needs an even num_samples (half the matvecs sketch A Omega, half compute A Q), got 5; use 6
    """
    check_count(num_samples, "num_samples", -(2**63))
    if estimator.even and num_samples % 2:
        n = num_samples
        valid = [c for c in (n - 1, n + 1) if c >= estimator.min_samples]
        raise ValueError(
            f"method={estimator.name!r} needs an even num_samples ({estimator.even_reason}), got {n}; "
            f"use {' or '.join(map(str, valid))}"
        )
    check_count(num_samples, "num_samples", estimator.min_samples, f" for method={estimator.name!r}")
    return num_samples


def max_samples(estimator: Estimator, dim: int) -> Optional[int]:
    """The largest ``num_samples`` ``estimator`` takes on an operator of dimension ``dim`` (``None``: no limit).

    Example:
        >>> max_samples(get("xdiag", "diagonal"), 10), max_samples(get("hutchinson", "trace"), 10)
        (10, None)
    """
    return None if estimator.max_per_dim is None else estimator.max_per_dim * dim


def check_options(method: str, quantity: str, options: Options) -> Estimator:
    """Validate ``method`` and its ``options`` for ``quantity``; return the estimator.

    ``exact`` takes none of the options (the transforms allow ``seed``/``generator``
    where the curvature itself is random, by checking those separately).
    """
    estimator = get(method, quantity)
    if not estimator.stochastic:
        given = options.given()
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply to the stochastic methods "
                f"({', '.join(map(repr, names(quantity, stochastic_only=True)))}); method={method!r} takes none of them"
            )
        return estimator
    if options.num_samples is not None:
        check_num_samples(estimator, options.num_samples)
    check_random_source(options.seed, options.generator)
    if options.distribution is not None:
        check_distribution(options.distribution)
    adaptive = check_tolerances(options.rtol, options.atol, options.max_matvecs)
    if adaptive and not estimator.adaptive:
        supported = [e.name for e in estimators(quantity) if e.adaptive]
        raise ValueError(
            f"rtol/atol/max_matvecs (adaptive stopping) are supported by methods {', '.join(map(repr, supported))}, "
            f"not method={method!r}; pass num_samples instead"
        )
    return estimator


def check_random_source(seed: Any, generator: Any) -> None:
    """``seed`` and ``generator`` are each valid and not both given."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def run(
    op: LeafOperator,
    estimator: Estimator,
    options: Options,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Any:
    """Run ``estimator`` on ``op`` with validated ``options``; ``generator`` is the call's (already resolved).

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(3)], lambda V: [2 * V[0]], None)
        >>> run(op, get("hutchinson", "trace"), Options(num_samples=4), generator=torch.Generator().manual_seed(0)).value
        tensor(6.)
    """
    if not estimator.stochastic:
        return estimator.fn(op, chunk_size)
    num = options.num_samples if options.num_samples is not None else estimator.default_samples
    distribution = options.distribution if options.distribution is not None else estimator.default_distribution
    kwargs = dict(distribution=distribution, generator=generator, chunk_size=chunk_size)
    if estimator.adaptive:
        kwargs.update(rtol=options.rtol, atol=options.atol, max_matvecs=options.max_matvecs)
    return estimator.fn(op, num, **kwargs)


def table(quantity: str) -> List[Dict[str, Any]]:
    """One row per method of ``quantity`` (name, defaults, rules, error bar, citation) for docs and help.

    Example:
        >>> [row["method"] for row in table("trace")]
        ['exact', 'hutchinson', 'hutch++', 'xtrace', 'xnystrace']
    """
    rows = []
    for e in estimators(quantity):
        rows.append(dict(
            method=e.name, summary=e.summary, default_samples=e.default_samples, min_samples=e.min_samples,
            even=e.even, adaptive=e.adaptive, default_distribution=e.default_distribution, psd_only=e.psd_only,
            error_bar=e.error_bar, citation=e.citation,
        ))
    return rows

