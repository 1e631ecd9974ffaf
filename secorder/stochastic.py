"""Old import path of the stochastic-method names and options; read :mod:`secorder.estimators.registry`.

``TRACE_METHODS``/``DIAG_METHODS`` are the registry's stochastic names,
``StochasticOptions`` its :class:`~secorder.estimators.registry.Options`, and
:func:`estimate_trace`/:func:`estimate_diagonal` run a registered method.

Example:
    >>> TRACE_METHODS, DIAG_METHODS
    (('hutchinson', 'hutch++', 'xtrace', 'xnystrace'), ('hutchinson', 'xdiag'))
"""

from __future__ import annotations

from typing import Any, Optional

from .estimators import registry
from .estimators.probes import make_generator
from .operators import LeafOperator

__all__ = ["TRACE_METHODS", "DIAG_METHODS", "StochasticOptions", "estimate_trace", "estimate_diagonal"]

TRACE_METHODS = registry.names("trace", stochastic_only=True)
DIAG_METHODS = registry.names("diagonal", stochastic_only=True)
StochasticOptions = registry.Options


def _estimate(quantity: str, op: LeafOperator, method: str, options: Any, chunk_size: Optional[int]) -> Any:
    estimator = registry.check_options(method, quantity, options)
    generator = make_generator(options.seed, options.generator, op.templates[0].device)
    return registry.run(op, estimator, options, chunk_size, generator)


def estimate_trace(op: LeafOperator, method: str, options: Any, chunk_size: Optional[int] = None) -> Any:
    """Run the registered trace estimator ``method`` on ``op``.

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(3)], lambda V: [2 * V[0]], None)
        >>> estimate_trace(op, "hutchinson", StochasticOptions(num_samples=4, seed=0)).value
        tensor(6.)
    """
    return _estimate("trace", op, method, options, chunk_size)


def estimate_diagonal(op: LeafOperator, method: str, options: Any, chunk_size: Optional[int] = None) -> Any:
    """Run the registered diagonal estimator ``method`` on ``op``.

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(3)], lambda V: [2 * V[0]], None)
        >>> estimate_diagonal(op, "hutchinson", StochasticOptions(num_samples=4, seed=0)).value
        [tensor([2., 2., 2.])]
    """
    return _estimate("diagonal", op, method, options, chunk_size)
