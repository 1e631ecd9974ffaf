"""Estimators: pure linear algebra over a :class:`secorder.operators.LeafOperator`.

They see a batched matvec, the leaf templates and sizes; never a model or autograd.
One module per method family, each citing its source; each registers its methods in
:mod:`secorder.estimators.registry` when imported (all are imported here).
"""

from . import registry
from .exact import exact_diagonal, exact_trace
from .hutchinson import hutchinson_trace
from .hutchinson_diag import hutchinson_diagonal
from .hutchpp import hutchpp_trace
from .probes import DISTRIBUTIONS, draw_probes, make_generator, make_sampler
from .xtrace import xdiag, xnystrace, xtrace

__all__ = [
    "registry",
    "exact_diagonal",
    "exact_trace",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "hutchpp_trace",
    "xtrace",
    "xnystrace",
    "xdiag",
    "DISTRIBUTIONS",
    "draw_probes",
    "make_sampler",
    "make_generator",
]
