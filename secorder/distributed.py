"""Process groups for data-set losses: checked groups, a guarded handshake, sums and shared randomness.

A data-set loss made with ``process_group=`` (:func:`secorder.dataset_loss`) runs
on every rank of the group, each rank with its shard of the data. This module is
all it needs of ``torch.distributed``:

* :func:`resolve`: the group, checked when the loss is made (a ``TypeError`` for
  something that is not a group, a ``ValueError`` when ``torch.distributed`` is
  not initialised);
* :meth:`Group.handshake`: the first collective of every call, an all-reduce of a
  few integers that every rank must agree on (a checksum of the parameters'
  names, shapes and dtypes and of what the call computes) and of values every
  rank contributes (its number of batches). It waits at most
  :data:`HANDSHAKE_TIMEOUT`, so a rank that never joins (it called something else,
  or raised before the call) makes the others raise instead of hanging;
* :meth:`Group.all_reduce`: the sum of one flat buffer, the one collective of a
  pass over the data;
* :meth:`Group.shared_generator`: the call's randomness made identical on every
  rank: a given generator gets the state of rank 0's, and without one a seed is
  drawn on rank 0 (from its global RNG) and broadcast.

Gloo (CPU) and NCCL (CUDA) both work; small control tensors live on the CPU for
gloo and on the current CUDA device for NCCL.

Example:
    >>> resolve(None) is None
    True
    >>> resolve("world")
    Traceback (most recent call last):
    ...
    TypeError: process_group must be a torch.distributed ProcessGroup (for example torch.distributed.group.WORLD) or None, got str
"""

from __future__ import annotations

import datetime
import zlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["HANDSHAKE_TIMEOUT", "Group", "resolve", "checksum", "is_initialized", "default_group_warning"]

#: How long the handshake that opens every call waits for the other ranks.
HANDSHAKE_TIMEOUT = datetime.timedelta(seconds=300)

_NOT_INITIALISED = (
    "process_group: torch.distributed is not initialised; call torch.distributed.init_process_group(...) "
    "on every rank first (torchrun sets up the environment for it)"
)


_NO_FUNCTORCH = (
    "a data-set loss with process_group cannot run inside torch.func transforms (vmap, grad, jacrev) "
    "around the secorder call: torch.distributed's collectives do not support them; call the "
    "transform directly, or drop process_group"
)


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def default_group_warning() -> Optional[str]:
    """A warning for a data-set loss without ``process_group`` in an initialised multi-rank run, else ``None``."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    return ("torch.distributed is initialised with several ranks, but the data-set loss has process_group=None: "
            "each rank computes the curvature of its own data alone; pass "
            "process_group=torch.distributed.group.WORLD to sum over the ranks (after init_process_group: "
            "before it, torch.distributed.group.WORLD is None)")


def checksum(text: str) -> int:
    """A checksum of ``text`` that is the same in every process (``hash`` is salted per process).

    Example:
        >>> checksum("weight:(2, 3):float32") == checksum("weight:(2, 3):float32")
        True
    """
    return zlib.crc32(text.encode())


class Group:
    """A checked process group: its rank, size and the device of its control tensors."""

    def __init__(self, group: "torch.distributed.ProcessGroup"):
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.size = torch.distributed.get_world_size(group)
        self.backend = str(torch.distributed.get_backend(group)).lower()

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    def control_device(self) -> torch.device:
        """Where small control tensors go: the current CUDA device for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check_alive(self) -> None:
        if not is_initialized():
            raise ValueError(_NOT_INITIALISED)

    def handshake(self, signature: str, values: Sequence[int] = ()) -> List[List[int]]:
        """Check that every rank passes the same ``signature``; gather every rank's ``values``.

        One all-reduce (maximum) of ``[c, -c, v_00, ..]`` with ``c`` the checksum of
        ``signature`` and ``v_rj`` rank ``r``'s ``values[j]`` (non-negative integers) in
        its own slot. It waits at most :data:`HANDSHAKE_TIMEOUT` for the others.

        Returns:
            ``values`` of every rank, ``[rank][j]``.

        Raises:
            ValueError: the ranks disagree on ``signature`` (this rank's is quoted).
            RuntimeError: another rank did not join within the timeout.
        """
        self._check_alive()
        code = checksum(signature)
        n = len(values)
        buf = torch.zeros(2 + self.size * n, dtype=torch.int64)
        buf[0], buf[1] = code, -code
        for j, v in enumerate(values):
            buf[2 + self.rank * n + j] = int(v)
        buf = buf.to(self.control_device())
        work = torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=self.group, async_op=True)
        self._wait(work)
        out = buf.cpu().tolist()
        if out[0] != code or -out[1] != code:
            raise ValueError(
                f"the ranks of process_group disagree on the call: every rank must pass parameters with the same "
                f"names, shapes and dtypes and call the same transform with the same options; rank {self.rank} "
                f"has {signature}"
            )
        return [out[2 + r * n: 2 + (r + 1) * n] for r in range(self.size)]

    def all_gather(self, buf: Tensor) -> List[Tensor]:
        """Every rank's ``buf`` (same shape on every rank), in rank order; waits at most :data:`HANDSHAKE_TIMEOUT`.

        Raises:
            RuntimeError: another rank did not join within the timeout, or ``buf`` is
                inside a ``torch.func`` transform.
        """
        self._check_alive()
        if torch._C._functorch.is_functorch_wrapped_tensor(buf):
            raise RuntimeError(_NO_FUNCTORCH)
        out = [torch.empty_like(buf) for _ in range(self.size)]
        work = torch.distributed.all_gather(out, buf.contiguous(), group=self.group, async_op=True)
        self._wait(work)
        return out

    def _wait(self, work) -> None:
        try:
            work.wait(timeout=HANDSHAKE_TIMEOUT)
        except RuntimeError as err:
            raise RuntimeError(
                f"rank {self.rank}: the other ranks of process_group did not join this call within "
                f"{HANDSHAKE_TIMEOUT.total_seconds():g} s: every rank must make the same calls on the data-set loss "
                f"(a rank that raised, returned early or called something else leaves the others waiting) ({err})"
            ) from err

    def all_reduce(self, buf: Tensor) -> Tensor:
        """The sum of ``buf`` over the ranks (differentiable when ``buf`` requires grad, in eager autograd)."""
        self._check_alive()
        if torch._C._functorch.is_functorch_wrapped_tensor(buf):
            raise RuntimeError(_NO_FUNCTORCH)
        if buf.requires_grad and torch.is_grad_enabled():
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(buf, group=self.group)
        buf = buf.clone()
        torch.distributed.all_reduce(buf, group=self.group)
        return buf

    def shared_generator(self, generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
        """The call's generator, identical on every rank (see the module docstring)."""
        self._check_alive()
        control = self.control_device()
        if generator is None:
            seed = torch.zeros((), dtype=torch.int64)
            if self.rank == 0:
                seed = torch.randint(0, 2**62, (), dtype=torch.int64)
            seed = seed.to(control)
            torch.distributed.broadcast(seed, src=self._global(0), group=self.group)
            return torch.Generator(device=device).manual_seed(int(seed.cpu()))
        state = generator.get_state().to(control)
        torch.distributed.broadcast(state, src=self._global(0), group=self.group)
        generator.set_state(state.cpu())
        return generator

    def _global(self, rank: int) -> int:
        return torch.distributed.get_global_rank(self.group, rank) if self.group is not None else rank


def resolve(process_group: object) -> Optional[Group]:
    """``process_group`` checked: ``None`` (one process) or a :class:`Group`.

    Raises:
        TypeError: not a ``ProcessGroup``.
        ValueError: ``torch.distributed`` is not initialised.
    """
    if process_group is None:
        return None
    if not torch.distributed.is_available():
        raise ValueError("process_group: this build of PyTorch has no torch.distributed")
    if not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup (for example torch.distributed.group.WORLD) "
            f"or None, got {type(process_group).__name__}"
        )
    if not is_initialized():
        raise ValueError(_NOT_INITIALISED)
    return Group(process_group)
