"""Result pytrees of the stochastic estimators: the estimate with its error bar.

:class:`TraceEstimate` and :class:`DiagonalEstimate` are ``NamedTuple`` s, so
they are pytrees for ``optree``, ``torch.utils._pytree`` and therefore for
``torch.func.vmap`` outputs: every field is a tensor (or a pytree of tensors).

Each also carries ``engine``, the route that produced it (``"structured"`` or
``"generic"``; ``None`` for one made by hand, rebuilt from its fields by a pytree
operation such as ``torch.func.vmap``, or made inside ``torch.compile``). It is an
attribute, not a field: the fields stay tensors.

``stop`` records why sampling ended, as a 0-dim ``int64`` tensor (a tensor, not
a string, so that the result stays a pytree of tensors):

* ``0`` (:data:`STOP_NUM_SAMPLES`): no tolerance was asked; the fixed
  ``num_samples`` were drawn,
* ``1`` (:data:`STOP_TOLERANCE`): the standard error met ``rtol``/``atol``,
* ``2`` (:data:`STOP_BUDGET`): the matvec budget ran out first.

Example:
    >>> import torch
    >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    >>> est.value, est.per_leaf, est.num_matvecs
    (tensor(4.), tensor([2., 2.]), tensor(2))
    >>> est.stop_reason
    'num_samples'
    >>> est
    TraceEstimate(value=tensor(4.), stderr=tensor(1.), num_matvecs=tensor(2), per_leaf=tensor([2., 2.]), per_leaf_stderr=tensor([1., 0.]), stop='num_samples', dof=tensor(1.))
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import tree

__all__ = [
    "CarriesEngine",
    "with_engine",
    "TraceEstimate",
    "DiagonalEstimate",
    "STOP_NUM_SAMPLES",
    "STOP_TOLERANCE",
    "STOP_BUDGET",
    "z_score",
    "t_score",
]

STOP_NUM_SAMPLES = 0
STOP_TOLERANCE = 1
STOP_BUDGET = 2
_STOP_NAMES = {STOP_NUM_SAMPLES: "num_samples", STOP_TOLERANCE: "tolerance", STOP_BUDGET: "budget"}


def z_score(level: float) -> float:
    """Two-sided standard-normal quantile for a confidence ``level`` in (0, 1).

    Example:
        >>> round(z_score(0.95), 4)
        1.96
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"level must be a float in (0, 1), got {type(level).__name__}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def t_score(level: float, dof: float) -> float:
    """Two-sided Student-t quantile: ``P(|T| <= t) = level`` for ``T`` with ``dof`` degrees of freedom.

    ``dof`` is a non-negative integer (``0``: no spread was observed, ``inf``) or ``inf``
    (the normal quantile, :func:`z_score`).
    Exact for integer ``dof`` (the closed forms of Abramowitz and Stegun 26.7.3-4,
    inverted by bisection); ``dof >= 1000`` uses the normal quantile plus the first
    two terms of its Cornish-Fisher expansion (error below 2e-8 up to level 0.99).

    Example:
        >>> round(t_score(0.95, 1), 3), round(t_score(0.95, 3), 3), round(t_score(0.95, math.inf), 3)
        (12.706, 3.182, 1.96)
    """
    z = z_score(level)
    if isinstance(dof, bool) or not isinstance(dof, (int, float)) or not dof >= 0:
        raise ValueError(f"dof must be a non-negative number or inf, got {dof!r}")
    if dof == 0:
        return math.inf
    if math.isinf(dof):
        return z
    if dof != int(dof):
        raise ValueError(f"dof must be an integer or inf, got {dof}")
    nu = int(dof)
    if nu >= 1000:
        return z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
    lo, hi = 0.0, max(z, 1.0)
    while _t_central(hi, nu) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_central(mid, nu) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def _t_central(t: float, nu: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``nu`` (integer) degrees of freedom."""
    theta = math.atan(t / math.sqrt(nu))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if nu % 2:
        term, total = 1.0, 1.0 if nu > 1 else 0.0
        for k in range(1, (nu - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total) if nu > 1 else 2 / math.pi * theta
    term, total = 1.0, 1.0
    for k in range(1, nu // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def _bounds(level: float, dof: Any, value: Any, stderr: Any) -> Tuple[Any, Any]:
    """``value -+ t * stderr`` leafwise; an interval with ``dof = 0`` (one sample) is the whole line."""
    q = _quantiles(level, dof)

    def half(s: Tensor) -> Tensor:
        width = q * s
        if isinstance(q, Tensor) or math.isinf(q):
            width = torch.where(torch.as_tensor(q, device=s.device) == math.inf, torch.full_like(s, math.inf), width)
        return width

    lo = tree.tree_map(lambda v, s: v - half(s), value, stderr)
    hi = tree.tree_map(lambda v, s: v + half(s), value, stderr)
    return lo, hi


def sample_dof(samples: Tensor) -> Tensor:
    """Degrees of freedom of the standard error of a mean over the last dim: ``n - 1``."""
    return torch.tensor(float(samples.shape[-1] - 1), dtype=samples.dtype, device=samples.device)


def _quantiles(level: float, dof: Any) -> Any:
    """``t_score(level, dof)`` for a ``dof`` that is ``None`` (normal), a number or a tensor (elementwise)."""
    if dof is None:
        return z_score(level)
    if not isinstance(dof, Tensor):
        return t_score(level, dof)
    values = dof.detach().double()
    if values.dim() == 0:
        return t_score(level, float(values))
    table = {v: t_score(level, v) for v in set(values.flatten().tolist())}
    return torch.tensor([table[v] for v in values.flatten().tolist()], dtype=values.dtype,
                        device=dof.device).reshape(dof.shape)


def std_error(samples: Tensor) -> Tensor:
    """Standard error of the mean over the last dim (``nan`` for a single sample: no spread to estimate it from)."""
    n = samples.shape[-1]
    if n < 2:
        return torch.full(samples.shape[:-1], math.nan, dtype=samples.dtype, device=samples.device)
    return samples.std(dim=-1, correction=1) / math.sqrt(n)


def _stop_name(stop: Tensor) -> str:
    return _STOP_NAMES[int(stop)]


def _repr(result: Any) -> str:
    """``Name(field=..., stop='tolerance')``: the stop reason by name where ``stop`` is a plain 0-dim tensor."""
    stop = result.stop
    shown = repr(stop)
    if isinstance(stop, Tensor) and stop.ndim == 0 and not torch._C._functorch.is_functorch_wrapped_tensor(stop):
        try:
            shown = repr(_stop_name(stop))
        except Exception:  # a fake or meta tensor (torch.compile), or a value of no known reason
            pass
    fields = [f"{name}={shown if name == 'stop' else repr(value)}" for name, value in zip(result._fields, result)]
    return f"{type(result).__name__}({', '.join(fields)})"


class CarriesEngine:
    """Mixin of the result ``NamedTuple`` s: ``engine``, an attribute beside the fields (see the module docstring)."""

    engine: Optional[str] = None

    def _replace(self, **changes: Any) -> Any:
        out = super()._replace(**changes)  # type: ignore[misc]
        out.__dict__.update(self.__dict__)
        return out


def with_engine(result: Any, engine: str) -> Any:
    """``result`` with ``engine`` set (left as it is inside ``torch.compile``, where the write cannot be traced).

    Example:
        >>> import torch
        >>> with_engine(TraceEstimate.from_samples(torch.ones(1, 2)), "generic").engine
        'generic'
    """
    if isinstance(result, CarriesEngine) and not torch.compiler.is_compiling():
        result.engine = engine
    return result


class _TraceEstimate(NamedTuple):
    """A trace estimate with its standard error, matvec count and per-leaf breakdown.

    Fields:
        value: 0-dim estimate of the trace.
        stderr: 0-dim standard error of ``value`` (from the estimator's own samples).
        num_matvecs: 0-dim ``int64``, matrix-vector products spent.
        per_leaf: trace of each leaf's diagonal block, from the same probes. A 1-dim
            tensor (one entry per leaf) from the estimators; a pytree shaped like the
            differentiated argument (0-dim leaves) from :func:`secorder.trace_estimate`.
        per_leaf_stderr: standard errors of ``per_leaf``, same layout.
        stop: 0-dim ``int64``, why sampling stopped (see the module docstring).
        dof: degrees of freedom of ``stderr`` (0-dim float tensor; ``inf`` for an
            exact value, ``None`` for the normal approximation): the intervals use
            Student's t with ``dof`` degrees of freedom, which is what makes them
            hold their nominal coverage at small budgets.

    Example:
        >>> import torch
        >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0, 2.0]]))
        >>> lo, hi = est.interval(0.95)
        >>> bool(lo < est.value < hi)
        True
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: Tensor
    per_leaf: Any
    per_leaf_stderr: Any
    stop: Tensor
    dof: Any = None

    @classmethod
    def from_samples(
        cls,
        samples: Tensor,
        *,
        offset: Optional[Tensor] = None,
        num_matvecs: Optional[int] = None,
        stop: int = STOP_NUM_SAMPLES,
    ) -> "TraceEstimate":
        """Build an estimate from per-leaf samples shaped ``(num_leaves, num_samples)``.

        ``offset`` (shape ``(num_leaves,)``) is a deterministic part added to every
        sample (the low-rank trace of Hutch++); ``num_matvecs`` defaults to the
        number of samples; ``dof`` is the number of samples less one.

        Example:
            >>> import torch
            >>> TraceEstimate.from_samples(torch.ones(2, 4), offset=torch.ones(2)).value
            tensor(4.)
        """
        if offset is not None:
            samples = samples + offset[:, None]
        totals = samples.sum(dim=0)
        count = samples.shape[-1] if num_matvecs is None else num_matvecs
        return cls(
            value=totals.mean(),
            stderr=std_error(totals),
            num_matvecs=torch.tensor(count, dtype=torch.int64, device=samples.device),
            per_leaf=samples.mean(dim=-1),
            per_leaf_stderr=std_error(samples),
            stop=torch.tensor(stop, dtype=torch.int64, device=samples.device),
            dof=sample_dof(samples),
        )

    def interval(self, level: float = 0.95) -> Tuple[Tensor, Tensor]:
        """Confidence interval ``value +- t * stderr``, ``t`` the Student-t quantile with ``dof`` degrees of freedom.

        Reads ``dof`` on the host (normal quantile when ``dof`` is ``None``). With a
        single sample (``dof = 0``, ``stderr = nan``) the interval is ``(-inf, inf)``.

        Example:
            >>> import torch
            >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0, 2.0]]))
            >>> [round(float(x), 2) for x in est.interval(0.95)]   # t with 2 dof: 4.303
            [-0.48, 4.48]
        """
        return _bounds(level, self.dof, self.value, self.stderr)

    def per_leaf_interval(self, level: float = 0.95) -> Tuple[Any, Any]:
        """Confidence intervals of the per-leaf traces, as ``(lower, upper)`` in ``per_leaf``'s layout.

        Example:
            >>> import torch
            >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0]]))
            >>> est.per_leaf_interval()[1]
            tensor([4.4841, 2.0000])
        """
        return _bounds(level, self.dof, self.per_leaf, self.per_leaf_stderr)

    @property
    def stop_reason(self) -> str:
        """``"num_samples"``, ``"tolerance"`` or ``"budget"`` (reads ``stop``: a host sync)."""
        return _stop_name(self.stop)

    __repr__ = _repr


class TraceEstimate(CarriesEngine, _TraceEstimate):
    __doc__ = _TraceEstimate.__doc__


class _DiagonalEstimate(NamedTuple):
    """A diagonal estimate with entrywise standard errors and its matvec count.

    Fields:
        value: the estimated diagonal: a list of leaf tensors from the estimators, a
            pytree shaped like the differentiated argument from
            :func:`secorder.hessian_diag_estimate`.
        stderr: entrywise standard errors, same layout.
        num_matvecs: 0-dim ``int64``, matrix-vector products spent.
        stop: 0-dim ``int64``, why sampling stopped (see the module docstring).
        dof: degrees of freedom of ``stderr``, as in :class:`TraceEstimate`.

    Example:
        >>> import torch
        >>> est = DiagonalEstimate([torch.ones(2)], [torch.zeros(2)], torch.tensor(4), torch.tensor(0))
        >>> est.interval()[0]
        [tensor([1., 1.])]
    """

    value: Any
    stderr: Any
    num_matvecs: Tensor
    stop: Tensor
    dof: Any = None

    def interval(self, level: float = 0.95) -> Tuple[Any, Any]:
        """Entrywise intervals ``value +- t * stderr`` (Student's t with ``dof`` degrees of freedom).

        Example:
            >>> import torch
            >>> est = DiagonalEstimate([torch.ones(1)], [torch.ones(1)], torch.tensor(4), torch.tensor(0))
            >>> est.interval(0.95)[1]   # dof=None: the normal quantile
            [tensor([2.9600])]
            >>> est._replace(dof=torch.tensor(3.)).interval(0.95)[1]
            [tensor([4.1824])]
        """
        return _bounds(level, self.dof, self.value, self.stderr)

    @property
    def stop_reason(self) -> str:
        """``"num_samples"``, ``"tolerance"`` or ``"budget"`` (reads ``stop``: a host sync)."""
        return _stop_name(self.stop)

    __repr__ = _repr


class DiagonalEstimate(CarriesEngine, _DiagonalEstimate):
    __doc__ = _DiagonalEstimate.__doc__
