"""The commands' data set: batches of ``--batch-size``, sharded over the ranks of ``torchrun``.

Under ``torchrun --nproc-per-node N -m secorder report`` every rank runs the
command: :func:`launch` joins the process group from ``torchrun``'s environment
(gloo on the CPU, NCCL on CUDA, each rank on its ``LOCAL_RANK`` device), every
rank loads the same problem, :func:`shard` gives rank ``r`` the batches
``r, r + N, ...`` and the curvature is that of the whole data set
(:func:`secorder.dataset_loss` with the group). Only rank 0 prints. Without
``torchrun`` (no ``WORLD_SIZE`` above 1 in the environment) it is one process.

``--shard ddp|fsdp`` (:func:`wrap_model`) measures a copy of the model wrapped in
``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard`` over a 1-D mesh
of the ranks, as a user's training script would have it; ``--shard none`` (the
default) measures the plain model, replicated on every rank.

Example:
    >>> import torch
    >>> [tuple(x.shape) for x, _ in rebatch([(torch.zeros(5, 2), torch.zeros(5))], 2)]
    [(2, 2), (2, 2), (1, 2)]
    >>> shard(list("abcde"), Launch(None, 1, 2, torch.device("cpu"), False))
    ['b', 'd']
"""

from __future__ import annotations

import copy
import os
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import tree, wrappers
from .errors import UsageError

__all__ = ["Launch", "launch", "rebatch", "shard", "broadcast_parameters", "SHARDS", "add_shard_option",
           "wrap_model", "gathered"]

#: ``--shard``'s choices.
SHARDS = ("none", "ddp", "fsdp")

Batch = Tuple[Any, Any]


class Launch:
    """Where this process runs: its process group (``None`` alone), rank, number of ranks and device."""

    def __init__(self, group: Any, rank: int, size: int, device: torch.device, created: bool):
        self.group, self.rank, self.size, self.device, self.created = group, rank, size, device, created

    @property
    def printer(self) -> bool:
        """Whether this process prints the result (rank 0)."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if :func:`launch` joined it."""
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launch(device: torch.device, shard_how: str = "none") -> Launch:
    """Join ``torchrun``'s process group when there is one (``WORLD_SIZE`` > 1), else run alone.

    Args:
        device: ``--device``; a CUDA device without an index becomes ``cuda:LOCAL_RANK``.
        shard_how: ``--shard``; ``ddp`` and ``fsdp`` join a group even of one rank
            (``torchrun --nproc-per-node 1``), and need ``torchrun``'s environment.

    Returns:
        The :class:`Launch`.
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if shard_how != "none" and not initialised and "MASTER_ADDR" not in os.environ:
        raise UsageError(f"--shard {shard_how} needs a process group: launch the command with torchrun, for example "
                         f"torchrun --nproc-per-node 2 -m secorder ... --shard {shard_how}")
    if _world_size() <= 1 and not initialised and shard_how == "none":
        return Launch(None, 0, 1, device, False)
    dist = torch.distributed
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    group = dist.group.WORLD
    return Launch(group, dist.get_rank(), dist.get_world_size(), device, created)


def rebatch(batches: Sequence[Batch], batch_size: int) -> List[Batch]:
    """Split every batch into batches of at most ``batch_size`` examples (in order; a smaller last one)."""
    out: List[Batch] = []
    for inputs, targets in batches:
        n = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() > 0 else 1
        if n <= batch_size:
            out.append((inputs, targets))
            continue
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            out.append((tree.tree_map(lambda t: t[part], inputs), targets[part]))
    return out


def shard(batches: Sequence[Any], where: Launch) -> List[Any]:
    """Rank ``r``'s batches: ``r, r + size, ...`` (every rank gets some while there are enough)."""
    return list(batches[where.rank::where.size])


def broadcast_parameters(model: nn.Module, where: Launch) -> None:
    """Give every rank rank 0's parameters and buffers (the curvature is of one model)."""
    if where.group is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, src=0, group=where.group)


def add_shard_option(parser: Any) -> None:
    """``--shard none|ddp|fsdp``."""
    parser.add_argument("--shard", choices=SHARDS, default="none",
                        help="measure the model as distributed training holds it (under torchrun): 'ddp' wraps a copy "
                             "in DistributedDataParallel, 'fsdp' shards a copy with FSDP2's fully_shard over the "
                             "ranks (parameters and results as DTensor shards); 'none' (default) uses the plain model")


def wrap_model(model: nn.Module, how: str, where: Launch) -> nn.Module:
    """``model`` itself (``none``), or a copy of it wrapped in DDP or sharded with FSDP2 over the ranks of ``where``.

    FSDP2: every submodule with parameters of its own is ``fully_shard``-ed, then the
    root, on a 1-D mesh of all ranks (each parameter split along its first dimension).
    """
    if how == "none":
        return model
    if where.group is None:
        raise UsageError(f"--shard {how} needs a process group: launch the command with torchrun")
    twin = copy.deepcopy(model)
    if how == "ddp":
        ids = [where.device.index] if where.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(twin, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(where.device.type, (where.size,))
    for name, module in reversed(list(twin.named_modules())):  # children before their parents
        if name and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    return twin


def gathered(value: Any) -> Any:
    """A pytree with ``DTensor`` leaves gathered into full tensors (for printing; a collective over the mesh)."""
    return tree.tree_map(lambda t: t.full_tensor() if wrappers.is_dtensor(t) else t, value)


def layer_type(model: nn.Module, prefix: str) -> str:
    """The class name of ``model``'s submodule ``prefix``, as before any FSDP2 or DDP wrapping."""
    return wrappers.original_class(model.get_submodule(prefix)).__name__
