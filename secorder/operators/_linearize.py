"""The linearisation of a function at the primal point, for all leaves or one leaf, kept while it is reused.

A batched matvec is a ``vmap`` of a linear map (a VJP, or a VJP of a VJP) that was
built by one forward (and backward) pass at the primal point. Every chunk of probes
of the same call reuses that pass: :class:`LastLinearization` builds it on first
use and keeps the most recent one (all leaves, or the block of one leaf), so the
exact diagonal, which walks the leaves in order, holds one at a time. Under
``torch.compile`` it is rebuilt for every matvec instead.

The first build for all leaves inside :class:`~secorder.operators._footprint.measuring`
also measures the largest tensor it allocates, other than those shaped like the
``leaves`` (:mod:`secorder.operators._footprint`):
one probe's product carries intermediates of the same shapes, which the default
probe batch needs to know (:meth:`LastLinearization.probe_bytes`).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import tree
from ._footprint import largest_output, wanted

__all__ = ["restrict", "LastLinearization", "over_probes"]


def restrict(fn: Callable[[List[Tensor]], Any], leaves: List[Tensor], index: Optional[int]) -> Tuple[Callable, Any]:
    """``fn`` of all leaves as a function of leaf ``index`` alone (``None``: of the list of all leaves).

    Example:
        >>> import torch
        >>> g, x = restrict(lambda xs: xs[0] * xs[1], [torch.tensor(2.), torch.tensor(3.)], 1)
        >>> g(x + 1), x
        (tensor(8.), tensor(3.))
    """
    leaves = list(leaves)
    if index is None:
        return fn, leaves

    def of_leaf(x: Tensor) -> Any:
        return fn(leaves[:index] + [x] + leaves[index + 1:])

    return of_leaf, leaves[index]


class LastLinearization:
    """Memoise ``make(key)`` for the most recent ``key`` only.

    Example:
        >>> calls = []
        >>> lin = LastLinearization(lambda key: calls.append(key) or key)
        >>> lin(None), lin(None), lin(0), lin(None), calls
        (None, None, 0, None, [None, 0, None])
    """

    _UNSET = object()

    def __init__(self, make: Callable[[Optional[int]], Any], leaves: Sequence[Tensor] = ()):
        self._make = make
        self._leaf_shapes = [tuple(t.shape) for t in leaves]  # not counted by the measurement
        self._key: Hashable = self._UNSET
        self._value: Any = None
        self._measured = False
        self._nbytes: Optional[int] = None

    def __call__(self, key: Optional[int]) -> Any:
        if torch.compiler.is_compiling():
            # A linearisation kept across calls would cross torch.compile's frames (its
            # functorch-wrapped tensors cannot be captured): rebuild it per matvec there.
            return self._make(key)
        if self._key is self._UNSET or key != self._key:
            self._value = None  # free the previous linearisation before building the next
            if key is None and not self._measured and wanted():
                self._value, self._nbytes = largest_output(lambda: self._make(key), self._leaf_shapes)
                self._measured = True
            else:
                self._value = self._make(key)
            self._key = key
        return self._value

    def probe_bytes(self) -> Optional[int]:
        """Bytes of the largest tensor of the all-leaves build (built now if not yet); ``None`` if not measured.

        Example:
            >>> import torch
            >>> from secorder.operators._footprint import measuring
            >>> lin = LastLinearization(lambda key: torch.ones(3, 5) * 2)
            >>> with measuring():
            ...     lin.probe_bytes()   # 15 float32 entries
            60
            >>> LastLinearization(lambda key: torch.ones(3, 5) * 2).probe_bytes() is None   # not asked for
            True
        """
        if torch.compiler.is_compiling():
            return None
        self(None)
        return self._nbytes


def over_probes(fn: Callable[[Any], Any], V: Any) -> Any:
    """``vmap(fn)(V)`` over the leading probe dimension of every leaf of ``V``.

    A single probe (a Lanczos run's product) calls ``fn`` on it directly: ``vmap`` over
    one probe gives the same values and costs more (batching rules around every op of
    the linearisation's backward pass).

    Example:
        >>> import torch
        >>> over_probes(lambda v: [2 * v[0]], [torch.ones(1, 3)]), over_probes(lambda v: [2 * v[0]], [torch.ones(2, 1)])
        ([tensor([[2., 2., 2.]])], [tensor([[2.],
                [2.]])])
    """
    leaves, spec = tree.flatten(V)
    if leaves and all(t.shape[0] == 1 for t in leaves):
        out = fn(tree.unflatten(spec, [t[0] for t in leaves]))
        return tree.tree_map(lambda t: t.unsqueeze(0), out)
    return torch.func.vmap(fn)(V)
