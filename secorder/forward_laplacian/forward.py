"""The forward-Laplacian pass: seed the input, run ``f`` once, read the Laplacian off its output.

The differentiated argument's ``d`` entries are the seed directions: the input
enters ``f`` as a :class:`~.jet.JetTensor` with value ``x``, Jacobian the
identity (``d`` directions) and Laplacian zero, and leaves it as a jet whose
Laplacian is ``sum_i d^2 f / dx_i^2`` (Li et al. 2023, "Forward Laplacian: A New
Computational Framework for Neural Network-based Variational Monte Carlo";
Dangel et al. 2024, "Kronecker-factored approximate curvature for
physics-informed neural networks" and "Collapsing Taylor mode automatic
differentiation"). The Laplacian is a sum over directions, so a pass over a
subset of them gives that part of it: ``chunk_size`` bounds the directions per
pass (memory ``chunk_size`` times the largest intermediate) and the passes add up.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, tree
from .jet import ForwardPass, Jet, JetTensor

__all__ = ["forward_laplacian"]


def _seeds(leaves: List[Tensor], start: int, stop: int, trace: ForwardPass) -> List[JetTensor]:
    """Jets of the leaves for the directions ``start:stop`` of the raveled input (one-hot rows)."""
    k = stop - start
    jets = []
    offset = 0
    for leaf in leaves:
        n = leaf.numel()
        jac = torch.zeros((k, n), dtype=leaf.dtype, device=leaf.device)
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            jac[lo - start:hi - start, lo - offset:hi - offset] = torch.eye(hi - lo, dtype=leaf.dtype,
                                                                              device=leaf.device)
        lap = torch.zeros((), dtype=leaf.dtype, device=leaf.device).expand(leaf.shape)
        jets.append(JetTensor(Jet(leaf, jac.reshape((k,) + tuple(leaf.shape)), lap, trace)))
        offset += n
    return jets


def _own(trace: ForwardPass) -> Callable[[Any], Any]:
    def unwrap(a: Any) -> Any:
        return a.jet.value if isinstance(a, JetTensor) and a.jet.trace is trace else a

    return unwrap


def _laplacian_of_output(out: Any, has_aux: bool, trace: ForwardPass) -> Tuple[Tensor, Any]:
    if has_aux and not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"has_aux=True requires f to return a (loss, aux) tuple, got {type(out).__name__}")
    loss, aux = out if has_aux else (out, None)
    unwrap = _own(trace)
    value = unwrap(loss)
    _checks.check_scalar(value, False)
    if isinstance(loss, JetTensor) and loss.jet.trace is trace:
        lap = loss.jet.lap
    else:  # f's output does not depend on the differentiated argument
        lap = torch.zeros_like(value)
    return lap, (tree.tree_map(unwrap, aux) if has_aux else None)


def forward_laplacian(f: Callable[..., Any], args: tuple, argnums: _checks.Argnums, has_aux: bool,
                      chunk_size: Optional[int]) -> Tuple[Tensor, Any]:
    """The Laplacian of ``f`` with respect to ``args[argnums]`` (and ``f``'s aux output, or ``None``).

    Raises :class:`~.jet.UncoveredOperation` when ``f`` uses an operation
    without a rule, also when ``f`` catches that exception itself.
    """
    resolved = _checks.normalize_argnums(argnums, len(args))
    primals = _checks.select(args, argnums, resolved)
    _checks.check_differentiable(primals, argnums)
    leaves, spec = tree.flatten(primals)
    d = sum(leaf.numel() for leaf in leaves)
    step = d if chunk_size is None else chunk_size
    total, aux = None, None
    start = 0
    while True:
        stop = min(start + step, d)
        with ForwardPass() as trace:
            jets = _seeds(leaves, start, stop, trace)
            out = f(*_checks.replace(args, argnums, resolved, tree.unflatten(spec, jets)))
        if trace.uncovered is not None:
            raise trace.uncovered
        lap, part_aux = _laplacian_of_output(out, has_aux, trace)
        if total is None:
            total, aux = lap, part_aux
        else:
            total = total + lap
        start = stop
        if start >= d:
            return total, aux
