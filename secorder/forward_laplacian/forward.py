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

Without ``chunk_size``, the first call takes all directions in one pass and
notes the largest traced value's storage; on CPUs, later calls with the same
input shapes (and ``vmap`` batch) then split the directions evenly so that every
Jacobian stays below :data:`CPU_JACOBIAN_BYTES`. Allocations of that size are
served from memory the process reuses, where larger ones get fresh pages from
the kernel every time (glibc maps anything above 32 MiB anew); on the
benchmark's 1024 points of dimension 100 this made a call 10-15% faster, and
a training step as much, for the same result.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, tree
from .jet import ForwardPass, Jet, JetTensor, stored_numel

__all__ = ["forward_laplacian", "CPU_JACOBIAN_BYTES"]

#: The largest Jacobian (bytes) a pass aims for on CPUs when ``chunk_size`` is not given.
CPU_JACOBIAN_BYTES = 24 * 2**20


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


def _signature(leaves: List[Tensor]) -> tuple:
    """What the size of the Jacobians depends on besides ``f``: the leaves' shapes, dtypes, devices
    and ``vmap`` batch (their storage over their shape)."""
    batch = stored_numel(leaves[0]) // max(leaves[0].numel(), 1) if leaves else 1
    return tuple((tuple(leaf.shape), leaf.dtype, leaf.device) for leaf in leaves) + (batch,)


def _directions_per_pass(d: int, leaves: List[Tensor], chunk_size: Optional[int], sizes: Optional[dict]) -> int:
    if chunk_size is not None:
        return chunk_size
    if sizes is None or not leaves or leaves[0].device.type != "cpu":
        return max(d, 1)
    per_direction = sizes.get(_signature(leaves))
    if not per_direction:
        return max(d, 1)
    passes = max(1, -(-d * per_direction // CPU_JACOBIAN_BYTES))
    return max(1, -(-d // passes))


def forward_laplacian(f: Callable[..., Any], args: tuple, argnums: _checks.Argnums, has_aux: bool,
                      chunk_size: Optional[int], sizes: Optional[dict] = None) -> Tuple[Tensor, Any]:
    """The Laplacian of ``f`` with respect to ``args[argnums]`` (and ``f``'s aux output, or ``None``).

    ``sizes`` is the transform's memory of the storage per direction seen for
    each input signature (see the module docstring); it is updated here.
    Raises :class:`~.jet.UncoveredOperation` when ``f`` uses an operation
    without a rule, also when ``f`` catches that exception itself.
    """
    resolved = _checks.normalize_argnums(argnums, len(args))
    primals = _checks.select(args, argnums, resolved)
    _checks.check_differentiable(primals, argnums)
    leaves, spec = tree.flatten(primals)
    d = sum(leaf.numel() for leaf in leaves)
    step = _directions_per_pass(d, leaves, chunk_size, sizes)
    total, aux = None, None
    start = 0
    grad_on = torch.is_grad_enabled()
    while True:
        stop = min(start + step, d)
        # f runs with gradients on, so that an operation on a traced value with gradients off is torch.no_grad()
        # inside f or a custom autograd.Function's forward (the interpreter then falls back to the exact path)
        with ForwardPass() as trace, torch.enable_grad():
            jets = _seeds(leaves, start, stop, trace)
            out = f(*_checks.replace(args, argnums, resolved, tree.unflatten(spec, jets)))
        if trace.uncovered is not None:
            raise trace.uncovered
        lap, part_aux = _laplacian_of_output(out, has_aux, trace)
        if sizes is not None and chunk_size is None and leaves:
            sizes[_signature(leaves)] = max(sizes.get(_signature(leaves), 0), trace.widest)
        if total is None:
            total, aux = lap, part_aux
        else:
            total = total + lap
        start = stop
        if start >= d:
            if not grad_on:  # called under torch.no_grad(): what f computed carries no graph, as it would not
                total = total.detach()
                aux = tree.tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, aux)
            return total, aux
