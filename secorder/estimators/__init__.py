"""Estimators: pure linear algebra over a :class:`secorder.operators.LeafOperator`.

They see a batched matvec, the leaf templates and sizes; never a model or autograd.
One module per method family, each citing its source.
"""

from .exact import exact_diagonal, exact_trace

__all__ = ["exact_diagonal", "exact_trace"]
