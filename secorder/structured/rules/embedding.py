"""``nn.Embedding`` (the first layer, on integer tokens) and :class:`~secorder.structured.transformer.PositionalEmbedding`.

``z[n, t] = E[idx[n, t]]`` is linear in the table ``E``. Within one sample, the
positions holding the same token read the same row, so row ``v``'s diagonal is
``sum_n sum_{t, t' : idx = v} H_n[(t, j), (t', j)]``: the curvature is pulled back
to a per-sample table with one row per distinct token of the sample (a selection,
:class:`TokenGather`; each position maps to the first position holding its token),
whose diagonal is then scattered to the rows of ``E`` the batch uses. For a
tokenwise curvature (no attention between the loss and the embedding) the
positions are independent and this is the scatter of the curvature's diagonal;
behind attention, the positions sharing a token add their columns first (the
columns per sample stay as many). ``padding_idx`` gets a zero diagonal, as
autograd gives it a zero gradient. Nothing before an embedding can be
differentiated (its input is integer), so it is the first module of a model.

``PositionalEmbedding`` adds a table row per position: the Jacobian with respect
to its input is the identity and the table's diagonal is the curvature's
diagonal summed over the samples (zero for positions beyond the input's length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import Curvature, Diagonal, Term
from ..errors import Unsupported
from ..jacobians import Jacobian, Reshape
from ..registry import register_rule
from ..rule import Rule
from ..tokens import Tokenwise
from ..transformer import PositionalEmbedding

__all__ = ["EmbeddingRule", "EmbeddingState", "TokenGather", "PositionalEmbeddingRule", "PositionalEmbeddingState"]


class TokenGather(Jacobian):
    """``z[n, p] = u[n, local[n, p]]``: positions ``p`` read rows of a per-sample table ``u`` (``[N, P, d]``).

    ``z`` has shape ``shape`` (``[N, *pos, d]``, ``P`` positions); ``local`` is ``[N, P]``.
    """

    def __init__(self, local: Tensor, shape: Tuple[int, ...]):
        self.local, self.shape = local, tuple(shape)
        N, P = local.shape
        self.table = (N, P, self.shape[-1])

    def _scatter(self, B: Tensor, lead: int) -> Tensor:
        front = tuple(B.shape[:lead])
        src = B.reshape(front + self.table)
        idx = self.local.reshape((1,) * lead + self.local.shape + (1,)).expand(src.shape)
        return src.new_zeros(src.shape).scatter_add(lead + 1, idx, src)

    def t_columns(self, B: Tensor) -> Tensor:
        return self._scatter(B, 1)

    def t_vector(self, g: Tensor) -> Tensor:
        return self._scatter(g, 0)

    def pull_diagonal(self, t: Diagonal) -> Term:
        # Each position reads one row: the transposed selection keeps a diagonal diagonal.
        return Diagonal(self._scatter(t.d, 0))

    def pull_tokenwise(self, t: Tokenwise) -> Term:
        npos = len(self.shape) - 2
        if t.index is None and t.shape == self.shape and t.pos == tuple(range(1, npos + 1)) and not t.summed:
            return Tokenwise(t.inner, self.table, (1,), self.local.reshape(-1))
        return self.pull_factor(t.as_factor())


@dataclass
class EmbeddingState:
    idx: Tensor  # [N, *pos]
    out_shape: Tuple[int, ...]


@register_rule(nn.Embedding)
class EmbeddingRule(Rule[EmbeddingState]):
    parameters = ("weight",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.max_norm is not None:
            raise Unsupported("has max_norm (it renormalises its weight in place in the forward pass)")
        if module.scale_grad_by_freq:
            raise Unsupported("has scale_grad_by_freq=True (its gradient is not the derivative of the loss)")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, EmbeddingState]:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise Unsupported(f"takes integer token indices, got dtype {x.dtype}")
        if x.dim() < 1:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (no batch dimension)")
        z = F.embedding(x, tensors["weight"], self.module.padding_idx)
        return z, EmbeddingState(x, tuple(z.shape))

    def jacobian(self, state: EmbeddingState) -> Jacobian:
        raise Unsupported(
            "nn.Embedding takes integer indices: nothing before it can be differentiated, so it must come first"
        )

    def parameter_diagonal(self, state: EmbeddingState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        N = state.idx.shape[0]
        idx = state.idx.reshape(N, math.prod(state.idx.shape[1:]))  # [N, P]
        # local[n, p]: the first position of sample n holding the token at p.
        local = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(torch.int8).argmax(-1)
        table = curv.pulled(TokenGather(local, state.out_shape)).diagonal()  # [N, P, d]
        V = self.module.num_embeddings
        d = table.new_zeros((V, table.shape[-1])).index_add(0, idx.reshape(-1), table.reshape(-1, table.shape[-1]))
        if self.module.padding_idx is not None:
            keep = torch.arange(V, device=d.device) != self.module.padding_idx
            d = d * keep.to(d.dtype).unsqueeze(1)
        return {"weight": d}


@dataclass
class PositionalEmbeddingState:
    shape: Tuple[int, ...]
    num_positions: int


@register_rule(PositionalEmbedding)
class PositionalEmbeddingRule(Rule[PositionalEmbeddingState]):
    parameters = ("weight",)

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, PositionalEmbeddingState]:
        W = tensors["weight"]
        if x.dim() != 3 or x.shape[2] != W.shape[1] or x.shape[1] > W.shape[0]:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (expected [N, T <= {W.shape[0]}, {W.shape[1]}])")
        return x + W[: x.shape[1]], PositionalEmbeddingState(tuple(x.shape), W.shape[0])

    def jacobian(self, state: PositionalEmbeddingState) -> Jacobian:
        return Reshape(state.shape)

    def parameter_diagonal(self, state: PositionalEmbeddingState, curv: Curvature,
                           wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        d = curv.diagonal().sum(0)  # [T, d]
        rest = state.num_positions - d.shape[0]
        return {"weight": torch.cat([d, d.new_zeros((rest, d.shape[1]))], 0)}
