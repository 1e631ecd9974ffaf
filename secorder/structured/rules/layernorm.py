"""``nn.LayerNorm``: a nonlinearity applied at every position on its own (a token, for a transformer).

For one position's ``F`` normalised features (``F = prod(normalized_shape)``),
``xhat = (x - mean(x)) / sigma`` with ``sigma = sqrt(var(x) + eps)`` (biased
variance) and ``z = gamma * xhat + beta``. The Jacobian is
``J = diag(gamma) (I - 1 1^T / F - xhat xhat^T / F) / sigma``, symmetric apart from
``gamma``; ``J^T b`` costs ``O(F)`` per column, so token-level curvature goes back
per position (:class:`~secorder.structured.tokens.PerPosition`).

The residual of the exact Hessian at one position, with ``a = gamma * dL/dz``,
``a~ = a - mean(a)``, ``beta = a . xhat`` and ``alpha = 1 / (F sigma^2)``, is the
dense ``F x F`` block

    ``alpha [ -(a~ xhat^T + xhat a~^T) - beta I + (beta / F) 1 1^T + 3 (beta / F) xhat xhat^T ]``

(the Hessian of ``a . xhat(x)``), kept as ``F + 4`` signed columns per position:
``F`` one-hot columns for ``-alpha beta I`` and four for the rank-4 rest (the
symmetric product ``u v^T + v u^T`` as ``((u + v)(u + v)^T - (u - v)(u - v)^T) / 2``,
with ``u`` and ``v`` scaled to equal norms).

``gamma``'s diagonal is the channel-block quadratic form of ``xhat``, ``beta``'s
that of the all-ones vector, read in the channels-first layout
(:func:`~secorder.structured.tokens.channels_first`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..curvature import Curvature, Factor, Term
from ..errors import Unsupported
from ..jacobians import Jacobian
from ..registry import register_rule
from ..rule import Rule
from ..tokens import PerPosition, Tokenwise, channels_first

__all__ = ["LayerNormRule", "LayerNormState", "LayerNormRows"]


class LayerNormRows(Jacobian):
    """The Jacobian of layer normalisation on rows ``[R, *normalized_shape]``."""

    def __init__(self, xhat: Tensor, inv: Tensor, gamma: Optional[Tensor], feat: Tuple[int, ...]):
        self.xhat, self.inv, self.gamma, self.feat = xhat, inv, gamma, tuple(feat)  # xhat [R, F], inv [R, 1]

    def t_columns(self, B: Tensor) -> Tensor:
        K, R = B.shape[:2]
        b = B.reshape(K, R, self.xhat.shape[1])
        if self.gamma is not None:
            b = b * self.gamma
        out = (b - b.mean(-1, keepdim=True) - self.xhat * (b * self.xhat).mean(-1, keepdim=True)) * self.inv
        return out.reshape(tuple(B.shape))


@dataclass
class LayerNormState:
    x_shape: Tuple[int, ...]
    xhat: Tensor  # [R, F]
    inv: Tensor  # [R, 1], 1 / sigma
    gamma: Optional[Tensor]  # [F]
    npos: int  # leading dims after the batch that are positions


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule[LayerNormState]):
    parameters = ("weight", "bias")
    has_residual = True

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, LayerNormState]:
        ns = tuple(self.module.normalized_shape)
        if x.dim() < len(ns) + 1 or tuple(x.shape[x.dim() - len(ns):]) != ns:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (normalized_shape {ns} after a batch dim)")
        F = math.prod(ns)
        rows = x.reshape(math.prod(x.shape[:x.dim() - len(ns)]), F)
        c = rows - rows.mean(-1, keepdim=True)
        inv = torch.rsqrt((c * c).mean(-1, keepdim=True) + self.module.eps)
        xhat = c * inv
        gamma, beta = tensors.get("weight"), tensors.get("bias")
        gamma = None if gamma is None else gamma.reshape(F)
        z = xhat if gamma is None else xhat * gamma
        z = z if beta is None else z + beta.reshape(F)
        return z.reshape(x.shape), LayerNormState(tuple(x.shape), xhat, inv, gamma, x.dim() - 1 - len(ns))

    def jacobian(self, state: LayerNormState) -> Jacobian:
        feat = state.x_shape[1 + state.npos:]
        rows = LayerNormRows(state.xhat, state.inv, state.gamma, feat)
        if state.npos == 0:
            return rows
        return PerPosition(rows, state.x_shape, state.x_shape, state.npos)

    def residual(self, state: LayerNormState, grad_out: Tensor) -> Optional[Term]:
        xhat, inv = state.xhat, state.inv
        R, F = xhat.shape
        a = grad_out.reshape(R, F)
        if state.gamma is not None:
            a = a * state.gamma
        at = a - a.mean(-1, keepdim=True)
        beta = (a * xhat).sum(-1)  # [R] (xhat sums to zero, so this is a~ . xhat)
        alpha = (inv * inv).squeeze(-1) / F  # [R]
        # u v^T + v u^T with u = a~ / s, v = s xhat of equal norms (no cancellation between scales).
        # Any s > 0 gives the same matrix, so s carries no derivative (none through a norm at zero).
        na, nx = at.detach().norm(dim=-1, keepdim=True), xhat.detach().norm(dim=-1, keepdim=True)
        ok = (na > 0) & (nx > 0)
        s = torch.where(ok, (na / torch.where(ok, nx, torch.ones_like(nx))).sqrt(), torch.ones_like(na))
        u, v = at / s, xhat * s
        eye = torch.eye(F, dtype=xhat.dtype, device=xhat.device).unsqueeze(1).expand(F, R, F)
        ones = torch.ones_like(xhat)
        B = torch.cat([eye, torch.stack([u + v, u - v, ones, xhat])], 0)  # [F + 4, R, F]
        ab = alpha * beta
        w = torch.cat([(-ab).expand(F, R), torch.stack([-alpha / 2, alpha / 2, ab / F, 3 * ab / F])], 0)
        feat = state.x_shape[1 + state.npos:]
        term = Factor(B.reshape((F + 4, R) + feat), w)
        if state.npos == 0:
            return term
        return Tokenwise(term, state.x_shape, tuple(range(1, state.npos + 1)))

    def parameter_diagonal(self, state: LayerNormState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        N = state.x_shape[0]
        nfeat = len(state.x_shape) - 1 - state.npos
        cf = channels_first(curv, state.x_shape, nfeat)  # [N, *feat, *pos]
        R, F = state.xhat.shape
        P = math.prod(state.x_shape[1:1 + state.npos])
        out = {}
        shape = self.module.normalized_shape
        if "weight" in wanted:
            X = state.xhat.reshape(N, P, F).transpose(1, 2).unsqueeze(2)  # [N, F, 1, P]
            out["weight"] = cf.quadratic(X)[:, 0].reshape(shape)
        if "bias" in wanted:
            out["bias"] = cf.quadratic(state.xhat.new_ones((1, 1, 1, P)))[:, 0].reshape(shape)
        return out
