"""The operator interface: what an estimator sees of a curvature matrix.

An estimator never sees a model or autograd. It sees a :class:`LeafOperator`: a
symmetric linear operator on a list of leaf tensors (a flattened pytree), given by

* ``templates``: one tensor per leaf (shape, dtype and device of the operand),
* ``matvec(V)``: ``H V`` for a probe batch ``V`` (each leaf with a leading probe
  dimension ``k``),
* ``block_matvec(i, V_i)``: ``H_ii V_i`` (a tensor with a leading probe dimension) for the diagonal block of leaf ``i`` alone,
  which is all that a one-hot column of leaf ``i`` needs for the diagonal, and is
  cheaper than a full matvec (no tangents or gradients for the other leaves).

and ``psd``, whether the operator is known to be positive semi-definite (a GGN of a
convex loss, a Fisher), which lets ``xnystrace`` skip its definiteness check.

An operator that knows its exact diagonal more cheaply than by one-hot columns
(a ``J^T H_out J`` curvature from per-sample loss-factor products, a
Kronecker-factored curvature from its factors) also gives ``diagonal(chunk_size)``:
the exact diagonal, one tensor per leaf, with ``chunk_size`` bounding its working
memory as it bounds the one-hot columns. The exact estimators use it when present
(and report ``num_matvecs = 0``), so every quantity built on the exact diagonal
(the exact trace, per-leaf traces) gets the cheaper path with no change of its own.

``probe_bytes``, when given, returns the size in bytes of the largest tensor that
one probe's product allocates (an activation-sized intermediate, measured when the
operator builds its linearisation; ``None`` when it was not measured, as under
``torch.compile``). With their default chunk, the stochastic estimators put at most
``budget // probe_bytes`` probes through one batched product
(:func:`secorder.estimators._common.bounded_operator`); without it (the default
``None``) a batch is bounded by the operator's dimension alone.

``top_hint``, where an operator has one for free, gives a vector (a leaf list) with
large components along the eigenvectors of its largest eigenvalues: the Hessian's
is the gradient, which lies mostly in the Hessian's top eigenspace (Gur-Ari, Roberts
and Dyer 2018, "Gradient descent happens in a tiny subspace"). The Lanczos
estimators of the largest eigenvalues start from it plus a random vector
(:func:`secorder.estimators.eigen.lanczos_eigenpairs`).

``space`` is ``None`` for an operator on whole tensors. An operator on this rank's
pieces of sharded parameters (:mod:`secorder.operators.sharded`) gives the space
they belong to (:class:`secorder.shards.Space`: its dimension, sums of partial
inner products over the ranks, and the single-process random draws cut to this
rank's entries); the Lanczos estimators read it, and nothing else needs it.

:func:`secorder.operators.make_operator` builds one per curvature; the legacy
``torch_secorder`` shim builds one on the autograd engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from torch import Tensor

__all__ = ["LeafOperator"]


@dataclass(frozen=True)
class LeafOperator:
    """A symmetric operator on lists of leaf tensors, with batched (block) matvecs.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2., 1.], [1., 3.]])
        >>> op = LeafOperator(
        ...     templates=[torch.zeros(2)],
        ...     matvec=lambda V: [V[0] @ A],
        ...     block_matvec=lambda i, Vi: Vi @ A,
        ... )
        >>> op.matvec([torch.eye(2)])[0]
        tensor([[2., 1.],
                [1., 3.]])
    """

    templates: Sequence[Tensor]
    matvec: Callable[[List[Tensor]], List[Tensor]]
    block_matvec: Callable[[int, Tensor], Tensor]
    psd: bool = False
    diagonal: Optional[Callable[[Optional[int]], List[Tensor]]] = None
    space: Any = None
    probe_bytes: Optional[Callable[[], Optional[int]]] = None

    top_hint: Optional[Callable[[], List[Tensor]]] = None

    @property
    def sizes(self) -> List[int]:
        return [t.numel() for t in self.templates]

    @property
    def dim(self) -> int:
        """The dimension of the space (over every rank for a sharded operator)."""
        return self.space.dim if self.space is not None else sum(self.sizes)
