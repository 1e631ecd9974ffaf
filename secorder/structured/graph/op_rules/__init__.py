"""The built-in ATen operation rules of the graph walker: one registry entry per operation.

Module-like operations map onto the module rules (one place per piece of
math: :mod:`secorder.structured.rules`); shape and other parameter-free linear
operations use their own ``vjp`` as the Jacobian, or a structured one where it
keeps a diagonal curvature term cheap (reshapes, same-shape ``add``). Each
``batch`` check refuses an op that would mix the samples of a live value
(anything reading or moving dimension 0). One module per family:
:mod:`.shape`, :mod:`.arithmetic`, :mod:`.layers`, :mod:`.batch_stats`,
:mod:`.attention`, :mod:`.folded`.
"""

from . import arithmetic, attention, batch_stats, folded, layers, shape  # noqa: F401 (they register the rules)
from .attention import Attention
from .batch_stats import BatchStatisticsNorm
from .folded import FoldedAddmm

__all__ = ["Attention", "BatchStatisticsNorm", "FoldedAddmm"]
