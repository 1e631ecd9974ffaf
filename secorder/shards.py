"""Sharded parameters (FSDP2's ``DTensor`` shards): how they are laid out, gathered and given back.

``so.params_dict(model)`` of a model sharded with ``torch.distributed.fsdp.fully_shard``
gives ``DTensor`` leaves: on every rank of a 1-D device mesh, a slice of each
parameter along one dimension (``Shard(dim)``; ``torch.chunk``'s split, so the last
ranks may hold fewer rows, or none). A :class:`Layout` describes the differentiated
leaves of one call and is the only place that reads ``DTensor`` metadata:

* :meth:`Layout.of` checks them: all leaves sharded or none (the plain ones are
  named), one 1-D mesh, ``Shard`` placements, a mesh over exactly the ranks of the
  data-set loss's process group;
* :meth:`Layout.gather` makes full tensors out of every rank's pieces (one
  all-gather per dtype, of any number of leaves, with any leading batch dimensions),
  guarded by the handshake timeout like every first collective of a call;
* :meth:`Layout.local` cuts this rank's piece out of a full tensor and
  :meth:`Layout.export` returns it as a ``DTensor`` with the parameter's placement
  (shifted past leading batch dimensions), which ``full_tensor()`` gathers again;
* :meth:`Layout.space` is the flat vector space of the local pieces that the
  Lanczos estimators work in: its inner products are all-reduced over the mesh, and
  random vectors are drawn over the whole space in the single-process order, each
  rank keeping its entries, so results do not depend on the number of ranks.

Example:
    >>> import torch
    >>> chunks(7, 2), chunks(3, 4)   # the rows each rank holds (torch.chunk's split)
    ([(0, 4), (4, 7)], [(0, 1), (1, 2), (2, 3), (3, 3)])
    >>> Layout.of([torch.zeros(2)], ["['w']"], None) is None   # no DTensor: nothing to do
    True
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed, tree, wrappers
from .wrappers import is_dtensor

__all__ = ["Layout", "Space", "chunks", "ShardingError", "layout_of", "gathering", "vdot"]


class ShardingError(ValueError):
    """Sharded parameters that secorder cannot use as given (the message says which and why)."""


def chunks(size: int, world: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each rank's rows of a dimension of ``size`` split like ``torch.chunk`` (DTensor's ``Shard``).

    Example:
        >>> chunks(5, 3)
        [(0, 2), (2, 4), (4, 5)]
    """
    step = -(-size // world) if size else 0
    return [(min(r * step, size), min((r + 1) * step, size)) for r in range(world)]


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


class Layout:
    """How the differentiated leaves of one call are sharded (made by :meth:`of`)."""

    def __init__(self, leaves: Sequence[Tensor], names: Sequence[str], mesh, group: distributed.Group):
        from torch.distributed.tensor import Shard

        self.names = list(names)
        self.mesh = mesh
        self.group = group
        self.rank = group.rank
        self.size = group.size
        self.placements = [tuple(t.placements) for t in leaves]
        self.dims = [t.placements[0].dim for t in leaves]
        self.shapes = [tuple(t.shape) for t in leaves]
        self.dtypes = [t.dtype for t in leaves]
        self.device = leaves[0].to_local().device
        self.rows = [chunks(shape[d], self.size) for shape, d in zip(self.shapes, self.dims)]
        for name, t, shape, d, rows in zip(self.names, leaves, self.shapes, self.dims, self.rows):
            start, stop = rows[self.rank]
            expected = shape[:d] + (stop - start,) + shape[d + 1:]
            if tuple(t.to_local().shape) != expected:
                raise ShardingError(
                    f"params{name}: a DTensor of shape {shape} sharded on dim {d} over {self.size} ranks holds "
                    f"{tuple(t.to_local().shape)} on rank {self.rank}, not torch.chunk's {expected}: secorder reads "
                    "shards split like torch.chunk (as fully_shard and distribute_tensor make them)")
        self._shard = Shard

    def __repr__(self) -> str:
        return f"Layout({len(self.shapes)} leaves, rank {self.rank} of {self.size})"

    # -- checks --------------------------------------------------------------------------

    @classmethod
    def of(cls, leaves: Sequence[Tensor], names: Sequence[str], group: Optional[distributed.Group]) -> Optional["Layout"]:
        """The layout of ``leaves`` (named ``names``), or ``None`` when none is a ``DTensor``.

        Args:
            leaves: the differentiated leaves of a call.
            names: their paths (``tree.paths``), for messages.
            group: the data-set loss's checked process group (``None``: it has none).

        Raises:
            ShardingError: a mix of sharded and plain leaves, several meshes, a mesh of
                more than one dimension, a placement other than ``Shard``, no process
                group, or a process group over other ranks than the mesh.
        """
        sharded = [is_dtensor(t) for t in leaves]
        if not any(sharded):
            return None
        if not all(sharded):
            plain = [n for n, s in zip(names, sharded) if not s]
            some = next(n for n, s in zip(names, sharded) if s)
            raise ShardingError(
                f"params mixes sharded and unsharded tensors: params{some} is a DTensor but "
                f"{', '.join('params' + n for n in plain[:3])}{' ...' if len(plain) > 3 else ''} "
                f"{'is a plain tensor' if len(plain) == 1 else 'are plain tensors'}; pass every parameter as the "
                "sharded model gives it (so.params_dict(model) after fully_shard) or none sharded")
        mesh = leaves[0].device_mesh
        for name, t in zip(names, leaves):
            if t.device_mesh != mesh:
                raise ShardingError(f"params{name} lives on another device mesh ({t.device_mesh}) than "
                                    f"params{names[0]} ({mesh}): every sharded parameter must share one mesh")
        if mesh.ndim != 1:
            raise ShardingError(
                f"params{names[0]} lives on a {mesh.ndim}-D device mesh {mesh}: secorder reads shards on a 1-D mesh "
                "(fully_shard over one mesh dimension); hybrid sharding (HSDP) and tensor parallelism are not supported")
        from torch.distributed.tensor import Shard

        for name, t in zip(names, leaves):
            placement = t.placements[0]
            if type(placement) is not Shard:
                raise ShardingError(
                    f"params{name} has placement {placement}: secorder reads Shard(dim) placements (what fully_shard "
                    "makes); gather it with .full_tensor(), or shard it")
        if group is None:
            raise ShardingError(
                f"params{names[0]} is sharded (a DTensor): sharded parameters need a data-set loss with a process "
                "group, so.dataset_loss(f, data, process_group=torch.distributed.group.WORLD), whose ranks hold "
                "this rank's data; the transforms gather the parameters once per call and sum over the ranks")
        mesh_ranks = torch.distributed.get_process_group_ranks(mesh.get_group())
        data_ranks = torch.distributed.get_process_group_ranks(group.group)
        if sorted(mesh_ranks) != sorted(data_ranks):
            raise ShardingError(
                f"process_group does not match the device mesh of the sharded parameters: the mesh spans ranks "
                f"{mesh_ranks}, process_group spans {data_ranks}; pass the group the model is sharded over "
                "(mesh.get_group(), or torch.distributed.group.WORLD for a mesh over every rank)")
        return cls(leaves, names, mesh, distributed.Group(mesh.get_group()))

    def signature(self) -> str:
        """What every rank must agree on (part of the call's handshake)."""
        return "sharded " + ", ".join(f"{n}:{s}:{d}:Shard({p})" for n, s, d, p in
                                      zip(self.names, self.shapes, self.dtypes, self.dims))

    # -- gathering and cutting -----------------------------------------------------------------

    def _local_shape(self, i: int, rank: int) -> Tuple[int, ...]:
        d, (start, stop) = self.dims[i], self.rows[i][rank]
        shape = self.shapes[i]
        return shape[:d] + (stop - start,) + shape[d + 1:]

    def local_shape(self, i: int) -> Tuple[int, ...]:
        """The shape of this rank's piece of leaf ``i``."""
        return self._local_shape(i, self.rank)

    def gather(self, parts: Sequence[Tensor], lead: int = 0) -> List[Tensor]:
        """Full tensors from every rank's pieces: ``parts[i]`` is ``(*batch, *local_shape_i)`` with ``lead`` batch dims.

        One all-gather per dtype over the mesh (none on one rank), guarded by
        :data:`secorder.distributed.HANDSHAKE_TIMEOUT`.
        """
        parts = [p.to_local() if is_dtensor(p) else p for p in parts]
        if len(parts) != len(self.shapes):
            raise RuntimeError(f"internal: {len(parts)} pieces for {len(self.shapes)} sharded leaves")
        if self.size == 1:
            return list(parts)
        batch = tuple(parts[0].shape[:lead])
        count = math.prod(batch)
        out: List[Optional[Tensor]] = [None] * len(parts)
        for dtype in dict.fromkeys(p.dtype for p in parts):
            idx = [i for i, p in enumerate(parts) if p.dtype == dtype]
            sizes = [[count * math.prod(self._local_shape(i, r)) for i in idx] for r in range(self.size)]
            width = max(sum(s) for s in sizes)
            buf = torch.zeros(width, dtype=dtype, device=parts[idx[0]].device)
            mine = torch.cat([parts[i].reshape(-1) for i in idx])
            buf[: mine.numel()] = mine
            pieces = self.group.all_gather(buf)
            for k, i in enumerate(idx):
                rows = []
                for r in range(self.size):
                    start = sum(sizes[r][:k])
                    rows.append(pieces[r][start: start + sizes[r][k]].reshape(batch + self._local_shape(i, r)))
                out[i] = torch.cat(rows, dim=lead + self.dims[i])
        return out

    def local(self, i: int, full: Tensor, lead: int = 0) -> Tensor:
        """This rank's piece of leaf ``i`` cut out of ``full`` (``lead`` leading batch dims), a copy of its own."""
        start, stop = self.rows[i][self.rank]
        return full.narrow(lead + self.dims[i], start, stop - start).clone()

    def export(self, i: int, full: Tensor, lead: int = 0) -> Tensor:
        """``full`` (shaped like leaf ``i`` after ``lead`` batch dims) as a ``DTensor`` sharded like the leaf."""
        return self.wrap(i, self.local(i, full, lead), tuple(full.shape), lead)

    def wrap(self, i: int, piece: Tensor, shape: Tuple[int, ...], lead: int = 0) -> Tensor:
        """This rank's ``piece`` of a tensor of global ``shape`` as a ``DTensor`` sharded like leaf ``i``."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(piece, self.mesh, [self._shard(self.dims[i] + lead)], run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_strides(shape))

    def export_all(self, full: Sequence[Tensor], lead: int = 0) -> List[Tensor]:
        """:meth:`export` of every leaf."""
        return [self.export(i, t, lead) for i, t in enumerate(full)]

    def space(self) -> "Space":
        """The flat space of this rank's pieces, with sums over the mesh (for the Lanczos estimators)."""
        return Space(self)


class Space:
    """The vectors of a sharded operator, flattened: this rank's entries of every leaf, in leaf order.

    It is what the Lanczos estimators (:mod:`secorder.estimators.lanczos`) need of
    a space besides its matvec: :attr:`dim`, the dimension of the whole space;
    :meth:`sum`, partial sums of this rank's entries made global (one all-reduce);
    :meth:`norm`; :meth:`local`, this rank's entries of vectors drawn over the whole
    space (``(p, dim)``), so that every rank draws the single-process random
    vectors; :meth:`shifted`, this rank's entries of a cyclic shift of such a vector.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.dim = sum(math.prod(s) for s in layout.shapes)
        self.offsets = [0]
        for s in layout.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(s))

    def sum(self, x: Tensor) -> Tensor:
        return self.layout.group.all_reduce(x) if self.layout.size > 1 else x

    def norm(self, x: Tensor) -> Tensor:
        """Per row of ``(p, local)``: the norm over the whole space."""
        return self.sum(x.pow(2).sum(dim=1)).sqrt()

    def local(self, X: Tensor) -> Tensor:
        """``(p, dim)`` rows over the whole space to ``(p, local)``: this rank's entries."""
        p, lay = X.shape[0], self.layout
        parts = []
        for i, shape in enumerate(lay.shapes):
            block = X[:, self.offsets[i]: self.offsets[i + 1]].reshape((p,) + shape)
            start, stop = lay.rows[i][lay.rank]
            parts.append(block.narrow(1 + lay.dims[i], start, stop - start).reshape(p, -1))
        return torch.cat(parts, dim=1)

    def shifted(self, X: Tensor, shift: int) -> Tensor:
        return self.local(torch.roll(X, shift, dims=1))

    def templates(self) -> List[Tensor]:
        """Stand-ins for the whole leaves (no memory), for drawing probes over the whole space."""
        lay = self.layout
        return [torch.empty((), dtype=d, device=lay.device).expand(s) for s, d in zip(lay.shapes, lay.dtypes)]


def layout_of(primals: Any, group: Optional[distributed.Group]) -> Optional[Layout]:
    """The :class:`Layout` of a call's differentiated ``primals`` (``None`` when none is sharded).

    Example:
        >>> layout_of({"w": torch.zeros(2)}, None) is None
        True
    """
    leaves = tree.leaves(primals)
    if not any(is_dtensor(t) for t in leaves):
        return None
    return Layout.of(leaves, tree.paths(primals), group)


def _twin(model: nn.Module, passed: Any, layout: Layout) -> nn.Module:
    """A hook-free twin of the FSDP2 ``model``; its sharded parameters not in ``passed`` gathered (one all-gather)."""
    names = set(passed) if isinstance(passed, dict) else set()
    constants = [(n, p.detach()) for n, p in model.named_parameters() if is_dtensor(p) and n not in names]
    full: Dict[int, Tensor] = {}
    if constants:
        sub = Layout.of([p for _, p in constants], [f"[{n!r}]" for n, _ in constants], layout.group)
        for (n, _), t in zip(constants, sub.gather([p for _, p in constants])):
            full[id(dict(model.named_parameters())[n])] = nn.Parameter(t, requires_grad=False)
    return wrappers.twin(model, full)


@contextlib.contextmanager
def gathering(layout: Layout, primals: Any, model: Optional[nn.Module] = None) -> Iterator[Any]:
    """The call's ``primals`` gathered (after a handshake of the ranks), with ``model``'s twin active in the block.

    Args:
        layout: the primals' layout.
        primals: the differentiated argument (a pytree of shards).
        model: the model of ``f`` (``FunctionalLoss.model``), if it is a module; without
            one, a forward of an FSDP2 module on this thread in the block raises.

    Yields:
        The primals as full tensors.
    """
    layout.group.handshake(layout.signature())
    leaves, spec = tree.flatten(primals)
    full = tree.unflatten(spec, layout.gather(leaves))
    twins = {}
    if isinstance(model, nn.Module) and wrappers.is_fsdp(model):
        twins[id(model)] = _twin(model, primals, layout)
    # f without a module we know (a plain function): refuse FSDP2 forwards it might run on this thread
    with wrappers.active_twins(twins, guard=not isinstance(model, nn.Module)):
        yield full


def vdot(names: Sequence[str], xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <x_i, y_i>`` over ``DTensor`` leaves (and plain ones, counted once), equal on every rank.

    Leaves sharded on a 1-D mesh contribute their local partial sums, all-reduced
    together (one collective per mesh); other placements are reduced by ``DTensor``
    itself, leaf by leaf.

    Raises:
        TypeError: a pair mixes a ``DTensor`` and a plain tensor, or two placements.
    """
    from torch.distributed.tensor import DTensor, Partial, Shard

    plain: List[Tensor] = []
    partial: Dict[Any, List[Tensor]] = {}
    meshes: Dict[Any, Any] = {}
    for name, x, y in zip(names, xs, ys):
        if is_dtensor(x) != is_dtensor(y):
            raise TypeError(f"vdot: leaf {name or '<root>'} pairs a DTensor with a plain tensor; pass both sharded "
                            "like the parameters (or both gathered with .full_tensor())")
        if not is_dtensor(x):
            plain.append((x * y).sum())
            continue
        if tuple(x.placements) != tuple(y.placements) or x.device_mesh != y.device_mesh:
            raise TypeError(f"vdot: leaf {name or '<root>'} pairs placements {tuple(x.placements)} and "
                            f"{tuple(y.placements)}; pass both sharded the same way")
        if x.device_mesh.ndim == 1 and type(x.placements[0]) is Shard:
            key = id(x.device_mesh)
            meshes[key] = x.device_mesh
            partial.setdefault(key, []).append((x.to_local() * y.to_local()).sum())
        else:
            plain.append((x * y).sum().full_tensor())
    for key, terms in partial.items():
        local = torch.stack(terms).sum()
        plain.append(DTensor.from_local(local, meshes[key], [Partial()], run_check=False).full_tensor())
    return torch.stack([t.to(plain[0].device) for t in plain]).sum()
