"""Result pytrees of the stochastic estimators: the estimate with its error bar.

:class:`TraceEstimate` and :class:`DiagonalEstimate` are ``NamedTuple`` s, so
they are pytrees for ``optree``, ``torch.utils._pytree`` and therefore for
``torch.func.vmap`` outputs: every field is a tensor (or a pytree of tensors).

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
    TraceEstimate(value=tensor(4.), stderr=tensor(1.), num_matvecs=tensor(2), per_leaf=tensor([2., 2.]), per_leaf_stderr=tensor([1., 0.]), stop='num_samples')
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import tree

__all__ = [
    "TraceEstimate",
    "DiagonalEstimate",
    "STOP_NUM_SAMPLES",
    "STOP_TOLERANCE",
    "STOP_BUDGET",
    "z_score",
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


def std_error(samples: Tensor) -> Tensor:
    """Standard error of the mean over the last dim (``nan`` for a single sample)."""
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
    fields = [f"{name}={value!r}" for name, value in zip(result._fields[:-1], result[:-1])]
    return f"{type(result).__name__}({', '.join(fields)}, stop={shown})"


class TraceEstimate(NamedTuple):
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
        number of samples.

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
        )

    def interval(self, level: float = 0.95) -> Tuple[Tensor, Tensor]:
        """Normal-approximation confidence interval ``value +- z * stderr``.

        Example:
            >>> import torch
            >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0]]))
            >>> [round(float(x), 2) for x in est.interval(0.95)]
            [0.04, 3.96]
        """
        z = z_score(level)
        return self.value - z * self.stderr, self.value + z * self.stderr

    def per_leaf_interval(self, level: float = 0.95) -> Tuple[Any, Any]:
        """Confidence intervals of the per-leaf traces, as ``(lower, upper)`` in ``per_leaf``'s layout.

        Example:
            >>> import torch
            >>> est = TraceEstimate.from_samples(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
            >>> est.per_leaf_interval()[1]
            tensor([3.9600, 2.0000])
        """
        z = z_score(level)
        lo = tree.tree_map(lambda v, s: v - z * s, self.per_leaf, self.per_leaf_stderr)
        hi = tree.tree_map(lambda v, s: v + z * s, self.per_leaf, self.per_leaf_stderr)
        return lo, hi

    @property
    def stop_reason(self) -> str:
        """``"num_samples"``, ``"tolerance"`` or ``"budget"`` (reads ``stop``: a host sync)."""
        return _stop_name(self.stop)

    __repr__ = _repr


class DiagonalEstimate(NamedTuple):
    """A diagonal estimate with entrywise standard errors and its matvec count.

    Fields:
        value: the estimated diagonal: a list of leaf tensors from the estimators, a
            pytree shaped like the differentiated argument from
            :func:`secorder.hessian_diag_estimate`.
        stderr: entrywise standard errors, same layout.
        num_matvecs: 0-dim ``int64``, matrix-vector products spent.
        stop: 0-dim ``int64``, why sampling stopped (see the module docstring).

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

    def interval(self, level: float = 0.95) -> Tuple[Any, Any]:
        """Entrywise normal-approximation intervals ``value +- z * stderr``.

        Example:
            >>> import torch
            >>> est = DiagonalEstimate([torch.ones(1)], [torch.ones(1)], torch.tensor(4), torch.tensor(0))
            >>> est.interval(0.95)[1]
            [tensor([2.9600])]
        """
        z = z_score(level)
        lo = tree.tree_map(lambda v, s: v - z * s, self.value, self.stderr)
        hi = tree.tree_map(lambda v, s: v + z * s, self.value, self.stderr)
        return lo, hi

    @property
    def stop_reason(self) -> str:
        """``"num_samples"``, ``"tolerance"`` or ``"budget"`` (reads ``stop``: a host sync)."""
        return _stop_name(self.stop)

    __repr__ = _repr
