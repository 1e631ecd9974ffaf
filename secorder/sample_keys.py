"""Random draws keyed by each sample's content: Monte-Carlo labels that do not depend on batching or order.

The Monte-Carlo Fisher of a data-set loss draws labels for every sample. Drawn
from one generator per batch, a sample's labels depend on which batch it lands
in and on the order of the batches, which a shuffling ``DataLoader`` changes on
every pass: the "same" Fisher then differs between calls, between engines and
between the products of one call. Here every random number is a hash of (the
call's seed, the sample's content, the draw's position): a counter-based
generator (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"),
with SplitMix64's finaliser (Steele, Lea and Flood 2014) as the mixing function,
in vectorised ``int64`` arithmetic (wrapping, as two's complement does), on the
samples' device. A sample's labels then depend on the sample alone: the same in
every pass, batching and order, on both engines and every rank. Identical
samples get identical labels (to the Fisher they are one sample counted twice).

A sample is a row of the leading dimension of the batch's inputs (every tensor
leaf; a dict of tensors for a transformer, whose leaves with a leading dimension
of 1, such as ``position_ids``, are the same for every sample). The model's output rows map onto
them: ``k`` rows per sample when the output has ``k`` times as many rows (a
language model that flattens its tokens into the batch), row ``r`` being
position ``r mod k`` of sample ``r // k``; otherwise (one unbatched sample) the
rows are keyed by the whole batch and their position.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    >>> keys = SampleKeys.of(x, seed=7)
    >>> u = keys.uniforms(rows=3, per_row=2, draws=1)
    >>> u.shape, bool(((0 <= u) & (u < 1)).all()), torch.equal(u[:, 0], u[:, 2])   # rows 0 and 2 are equal
    (torch.Size([1, 3, 2]), True, True)
    >>> torch.equal(SampleKeys.of(x[[2, 0]], seed=7).uniforms(2, 2, 1), u[:, [2, 0]])  # order does not matter
    True
"""

from __future__ import annotations

import math
from typing import Any, List

import torch
from torch import Tensor

from . import tree

__all__ = ["SampleKeys"]

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_POSITION, _COLUMN, _DRAW, _LEAF = 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x2545F4914F6CDD1D, 0x27BB2EE687B0B0FD


def _shift(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (``>>`` is arithmetic on negative values)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """SplitMix64 (increment and finaliser) on every entry of an int64 tensor."""
    z = z + _GOLDEN
    z = (z ^ _shift(z, 30)) * _M1
    z = (z ^ _shift(z, 27)) * _M2
    return z ^ _shift(z, 31)


def _bits(leaf: Tensor, rows: int) -> Tensor:
    """The entries of each row as int64 bit patterns (floats exactly, through float64)."""
    flat = leaf.detach().reshape(rows, -1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(rows, -1)
    if flat.is_floating_point():
        return flat.to(torch.float64).view(torch.int64)
    return flat.to(torch.int64)


def _row_hash(leaf: Tensor, rows: int, salt: int) -> Tensor:
    bits = _bits(leaf, rows)
    columns = _mix(torch.arange(bits.shape[1], dtype=torch.int64, device=bits.device) * _COLUMN + salt)
    return _mix(bits ^ columns).sum(1)  # int64 sums wrap: a hash of the whole row, position by position


class SampleKeys:
    """One 64-bit key per sample of a batch, from the call's seed and the samples' content (module docstring).

    Passed as the ``generator`` of :func:`secorder.losses.sample_output_gradients`,
    it makes each sample's draws a function of the sample alone.

    Args:
        keys: ``int64 [N]``, one per sample.
    """

    __slots__ = ("keys",)

    def __init__(self, keys: Tensor):
        self.keys = keys

    @classmethod
    def of(cls, inputs: Any, seed: int) -> "SampleKeys":
        """The keys of the samples of ``inputs`` (a tensor or a pytree of them) under ``seed``.

        Example:
            >>> import torch
            >>> a = SampleKeys.of({"ids": torch.tensor([[1, 2], [1, 3]])}, seed=0).keys
            >>> a.dtype, a.shape, bool(a[0] != a[1])
            (torch.int64, torch.Size([2]), True)
        """
        leaves: List[Tensor] = [t for t in tree.leaves(inputs) if isinstance(t, Tensor)]
        rows = max((t.shape[0] for t in leaves if t.dim() > 0), default=1)  # [1, T] leaves broadcast
        device = leaves[0].device if leaves else torch.device("cpu")
        h = torch.full((rows,), (int(seed) & ((1 << 63) - 1)), dtype=torch.int64, device=device)
        for i, leaf in enumerate(leaves):
            if leaf.dim() > 0 and leaf.shape[0] == rows:
                part = _row_hash(leaf, rows, i * _LEAF)
            else:  # a leaf without the batch dimension: the same for every sample
                part = _row_hash(leaf.reshape(1, -1), 1, i * _LEAF).expand(rows)
            h = _mix(h ^ part.to(device))
        return cls(h)

    def _rows(self, rows: int) -> Tensor:
        """Keys of ``rows`` output rows: ``k`` consecutive rows per sample, or the batch's key and the row."""
        n = self.keys.shape[0]
        index = torch.arange(rows, dtype=torch.int64, device=self.keys.device)
        if rows % n == 0:
            k = rows // n
            base = self.keys.repeat_interleave(k) if k > 1 else self.keys
            return _mix(base ^ (index % k) * _POSITION) if k > 1 else base
        whole = _mix(self.keys).sum()
        return _mix(whole ^ index * _POSITION)

    def uniforms(self, rows: int, per_row: int, draws: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform numbers in ``[0, 1)``, ``[draws, rows, per_row]``: entry ``(m, r, j)`` of row ``r`` (53 bits).

        Example:
            >>> import torch
            >>> SampleKeys.of(torch.zeros(2, 3), seed=1).uniforms(2, 4, 3).shape
            torch.Size([3, 2, 4])
        """
        row_keys = self._rows(rows)
        device = row_keys.device
        columns = _mix(torch.arange(per_row, dtype=torch.int64, device=device) * _COLUMN)
        draw_keys = _mix(torch.arange(draws, dtype=torch.int64, device=device) * _DRAW + 1)
        z = _mix(_mix(row_keys[:, None] ^ columns[None, :])[None] ^ draw_keys[:, None, None])
        return (_shift(z, 11).to(torch.float64) * 2.0 ** -53).to(dtype)

    def normals(self, rows: int, per_row: int, draws: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard normal numbers, ``[draws, rows, per_row]`` (Box-Muller on two uniform streams)."""
        u = self.uniforms(rows, 2 * per_row, draws, torch.float64)
        u1, u2 = u[..., :per_row], u[..., per_row:]
        return (torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)
