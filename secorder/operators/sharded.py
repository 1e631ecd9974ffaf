"""Curvature of sharded parameters (FSDP2): the call on gathered parameters, results given back as shards.

A call whose differentiated leaves are ``DTensor`` shards (``so.params_dict`` of a
model sharded with ``fully_shard``) of a data-set loss with a process group runs
in three steps:

1. :func:`gathered`: a handshake of the ranks (names, global shapes, dtypes and
   placements must agree; a rank that never comes makes the others raise after
   :data:`secorder.distributed.HANDSHAKE_TIMEOUT`), then **one all-gather of the
   parameters** (:meth:`secorder.shards.Layout.gather`); FSDP2's forward hooks
   cannot run under ``torch.func`` (they swap the modules' parameters), so the
   model is called through a hook-free twin (:mod:`secorder.wrappers`) whose
   sharded constants (frozen parameters) are gathered once too. The call then
   computes on full tensors exactly what it computes for a DDP or single-process
   model: every product is a pass over this rank's batches and one all-reduce.
2. Parameter-sized state that lives across products is kept sharded where it is
   large: :func:`sharded_view` is the operator on this rank's pieces that
   ``so.eigenvalues`` and ``so.spectral_density`` run Lanczos on (the Krylov bases
   take ``1/world`` of the memory; each product all-gathers its probe block, applies
   the full operator, and keeps this rank's rows).
3. :func:`export`: results shaped like the parameters come back as ``DTensor``
   shards with the parameters' placements; scalars are plain tensors, equal on
   every rank.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional

from torch import Tensor

from .. import shards, tree, wrappers
from ..dataset import is_dataset_loss
from ..problem import Problem
from ..shards import Layout
from .base import LeafOperator

__all__ = ["layout_of", "gathered", "gather_tangent", "sharded_view", "export_tree", "export_leaves"]


def _group(f: Any):
    return f.group if is_dataset_loss(f) else None


def _model(f: Any) -> Any:
    inner = f.f if is_dataset_loss(f) else f
    return getattr(inner, "model", None)


def layout_of(f: Any, primals: Any) -> Optional[Layout]:
    """The :class:`~secorder.shards.Layout` of the call's differentiated ``primals``, or ``None`` (none is sharded).

    Raises:
        secorder.shards.ShardingError: shards that cannot be used (mixed with plain
            tensors, several or multi-dimensional meshes, no process group, a process
            group over other ranks than the mesh).
    """
    return shards.layout_of(primals, _group(f))


@contextlib.contextmanager
def gathered(problem: Problem, layout: Optional[Layout]) -> Iterator[Problem]:
    """The call ``problem`` on gathered parameters (itself when ``layout`` is ``None``), with twins active."""
    if layout is None:
        yield problem
        return
    with shards.gathering(layout, problem.primals, _model(problem.f)) as full:
        yield Problem(problem.f, problem.argnums, problem.has_aux, problem.args_with(full), problem.kwargs)


def gather_tangent(layout: Optional[Layout], v: Any) -> Any:
    """A tangent ``v`` (shards like the parameters) gathered; unchanged without a layout.

    Raises:
        secorder.shards.ShardingError: a leaf of ``v`` is not sharded like its parameter (named).
    """
    if layout is None:
        return v
    leaves, spec = tree.flatten(v)
    for path, leaf, placements, i in zip(tree.paths(v), leaves, layout.placements, range(len(leaves))):
        if not wrappers.is_dtensor(leaf) or tuple(leaf.placements) != placements or leaf.device_mesh != layout.mesh:
            got = (f"a DTensor with placements {tuple(leaf.placements)}" if wrappers.is_dtensor(leaf)
                   else "a plain tensor")
            raise shards.ShardingError(
                f"v{path} is {got}, but the parameters are sharded ({placements} on {layout.mesh}): pass v sharded "
                "like the parameters (a DTensor with their placements, as the transforms return)")
    return tree.unflatten(spec, layout.gather(leaves))


def export_leaves(layout: Optional[Layout], full: List[Tensor], lead: int = 0) -> List[Tensor]:
    """Full leaf results as shards like the parameters (unchanged without a layout)."""
    return list(full) if layout is None else layout.export_all(full, lead)


def export_tree(layout: Optional[Layout], value: Any, lead: int = 0) -> Any:
    """A result pytree shaped like the parameters (``lead`` batch dims first) as shards."""
    if layout is None or value is None:
        return value
    leaves, spec = tree.flatten(value)
    return tree.unflatten(spec, layout.export_all(leaves, lead))


def sharded_view(op: LeafOperator, layout: Layout) -> LeafOperator:
    """``op`` (on gathered parameters) as an operator on this rank's pieces (see the module docstring).

    Its ``matvec`` all-gathers the probe block over the mesh, applies ``op`` (one pass
    over the data, one all-reduce) and keeps this rank's rows; its ``space`` sums
    inner products over the ranks.
    """
    import torch

    templates = [torch.empty((), dtype=t.dtype, device=t.device).expand(layout.local_shape(i))
                 for i, t in enumerate(op.templates)]

    def matvec(V: List[Tensor]) -> List[Tensor]:
        out = op.matvec(layout.gather(V, lead=1))
        return [layout.local(i, o, lead=1) for i, o in enumerate(out)]

    def block_matvec(index: int, V: Tensor) -> Tensor:
        raise NotImplementedError("internal: per-leaf products run on the gathered operator")

    return LeafOperator(templates=templates, matvec=matvec, block_matvec=block_matvec, psd=op.psd,
                        space=layout.space())
