"""The commands' data set: batches of ``--batch-size``, sharded over the ranks of ``torchrun``.

Under ``torchrun --nproc-per-node N -m secorder report`` every rank runs the
command: :func:`launch` joins the process group from ``torchrun``'s environment
(gloo on the CPU, NCCL on CUDA, each rank on its ``LOCAL_RANK`` device), every
rank loads the same problem, :func:`shard` gives rank ``r`` the batches
``r, r + N, ...`` and the curvature is that of the whole data set
(:func:`secorder.dataset_loss` with the group). Only rank 0 prints. Without
``torchrun`` (no ``WORLD_SIZE`` above 1 in the environment) it is one process.

Example:
    >>> import torch
    >>> [tuple(x.shape) for x, _ in rebatch([(torch.zeros(5, 2), torch.zeros(5))], 2)]
    [(2, 2), (2, 2), (1, 2)]
    >>> shard(list("abcde"), Launch(None, 1, 2, torch.device("cpu"), False))
    ['b', 'd']
"""

from __future__ import annotations

import os
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import tree

__all__ = ["Launch", "launch", "rebatch", "shard", "broadcast_parameters"]

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


def launch(device: torch.device) -> Launch:
    """Join ``torchrun``'s process group when there is one (``WORLD_SIZE`` > 1), else run alone.

    Args:
        device: ``--device``; a CUDA device without an index becomes ``cuda:LOCAL_RANK``.

    Returns:
        The :class:`Launch`.
    """
    if _world_size() <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
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
