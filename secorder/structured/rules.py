"""Module rules: forward, backward of the curvature and of the gradient, parameter diagonals.

A rule wraps one leaf module. ``forward(x, values)`` evaluates the module with
the parameter ``values`` (``{local name: tensor}``) and returns the output and a
context. ``backward(curv, ctx)`` pulls the per-sample output curvature back to
the input (``J^T H J`` per sample), ``backward_grad`` pulls the loss gradient
back, ``residual(g, ctx)`` is the activation's residual diagonal at its input
(``None`` for all other modules), and ``param_diag`` / ``param_trace`` read the
Hessian diagonal of the module's own parameters off the output curvature
(Dangel, Harmeling, Hennig 2020, Sec. 3: ``H_W = sum_n J_W^T H_z J_W`` because
every supported module is linear in its parameters).

Hand-written contractions: a linear layer's weight diagonal is
``diag(H_z)^T (x * x)``; a convolution's is
``sum_{k, n} w_kn (B_kn X_n^T)**2`` with the unfolded input ``X`` (as in
BackPACK, Dangel, Kunstner, Hennig 2020, App. A).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from . import activations
from .curvature import Curvature, Factor, Shared
from .errors import Unsupported

__all__ = ["Rule", "make_rule", "fuse"]


class Rule:
    """Base rule: no parameters, backward via ``back_columns`` on explicit factor columns."""

    has_residual = False
    param_names: Tuple[str, ...] = ()

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    def forward(self, x: Tensor, values: Dict[str, Tensor]) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def back_columns(self, B: Tensor, ctx: Any) -> Tensor:
        """``J_n^T B[k, n]`` for columns ``B`` of shape ``[K, N, *out]``."""
        raise NotImplementedError

    def backward(self, curv: Curvature, ctx: Any) -> Curvature:
        return Curvature(factors=[Factor(self.back_columns(f.B, ctx), f.w) for f in curv.all_factors(ctx["out"])])

    def backward_grad(self, g: Tensor, ctx: Any) -> Tensor:
        return self.back_columns(g.unsqueeze(0), ctx).squeeze(0)

    def residual(self, g: Tensor, ctx: Any) -> Optional[Tensor]:
        return None

    def param_diag(self, curv: Curvature, ctx: Any, wanted: Set[str]) -> Dict[str, Tensor]:
        return {}

    def param_trace(self, curv: Curvature, ctx: Any, wanted: Set[str]) -> Optional[Tensor]:
        parts = [d.sum() for d in self.param_diag(curv, ctx, wanted).values()]
        return sum(parts[1:], parts[0]) if parts else None


def _where(name: str, module: nn.Module) -> str:
    return f"module {name!r} ({type(module).__name__})"


class Reshape(Rule):
    """Flatten, Identity, Dropout in eval mode: a per-sample reshape of the output."""

    def forward(self, x, values):
        m = self.module
        if isinstance(m, nn.Flatten):
            start = m.start_dim % x.dim() if x.dim() else 0
            if start == 0:
                raise Unsupported(f"{_where(self.name, m)} flattens the batch dimension")
            z = torch.flatten(x, m.start_dim, m.end_dim)
        else:
            z = x
        return z, {"in": x.shape, "out": z.shape}

    def back_columns(self, B, ctx):
        return B.reshape(B.shape[:2] + ctx["in"][1:])

    def backward(self, curv, ctx):
        shape = ctx["in"][1:]
        return Curvature(
            factors=[Factor(f.B.reshape(f.B.shape[:2] + shape), f.w) for f in curv.factors],
            diag=None if curv.diag is None else curv.diag.reshape(ctx["in"]),
            shared=[Shared(s.B.reshape(s.B.shape[:1] + shape), s.r, None if s.s is None else s.s.reshape(ctx["in"]))
                    for s in curv.shared],
        )


class Scale(Rule):
    """A per-sample diagonal Jacobian ``m``: elementwise activations and eval-mode BatchNorm."""

    def back_columns(self, B, ctx):
        return B * ctx["m"]

    def backward(self, curv, ctx):
        m = ctx["m"]
        full = ctx["in"]
        return Curvature(
            factors=[Factor(f.B * m, f.w) for f in curv.factors],
            diag=None if curv.diag is None else curv.diag * (m * m),
            shared=[Shared(s.B, s.r, m.expand(full) if s.s is None else s.s * m) for s in curv.shared],
        )


class Activation(Scale):
    def __init__(self, name, module, hessian: bool):
        super().__init__(name, module)
        self.has_residual = hessian and not activations.is_piecewise_linear(module)

    def forward(self, x, values):
        a, d1, d2 = activations.derivatives(self.module, x, self.has_residual)
        return a, {"in": x.shape, "out": a.shape, "m": d1, "d2": d2}

    def residual(self, g, ctx):
        return ctx["d2"] * g if self.has_residual else None


class BatchNorm(Scale):
    """``BatchNorm1d/2d`` in eval mode: ``z = gamma * (x - mean) / sqrt(var + eps) + beta``."""

    param_names = ("weight", "bias")

    def forward(self, x, values):
        m = self.module
        if m.training or m.running_mean is None:
            raise Unsupported(f"{_where(self.name, m)} must be in eval mode with running statistics")
        if x.dim() < 2:
            raise Unsupported(f"{_where(self.name, m)} on an input of shape {tuple(x.shape)}")
        if "running_mean" not in values or "running_var" not in values:
            raise Unsupported(f"{_where(self.name, m)}: running statistics missing from the buffers")
        shape = (-1,) + (1,) * (x.dim() - 2)
        mean, var = values["running_mean"], values["running_var"]
        inv = torch.rsqrt(var + m.eps).reshape(shape)
        xhat = (x - mean.reshape(shape)) * inv
        gamma, beta = values.get("weight"), values.get("bias")
        z = xhat * gamma.reshape(shape) if gamma is not None else xhat
        z = z + beta.reshape(shape) if beta is not None else z
        scale = inv * gamma.reshape(shape) if gamma is not None else inv
        return z, {"in": x.shape, "out": z.shape, "m": scale, "xhat": xhat}

    def param_diag(self, curv, ctx, wanted):
        out = {}
        if "weight" in wanted:
            out["weight"] = _channel_quadratic(curv, ctx["out"], ctx["xhat"])
        if "bias" in wanted:
            out["bias"] = _channel_quadratic(curv, ctx["out"], None)
        return out


def _channel_quadratic(curv: Curvature, shape, v: Optional[Tensor]) -> Tensor:
    """``sum_n v_nc^T H_n[c, c] v_nc`` per channel ``c`` (dim 1), ``v=None`` meaning ones."""
    N, C = shape[0], shape[1]
    total = None
    for f in curv.all_factors(shape) if curv.shared else curv.factors:
        B = f.B.reshape(f.B.shape[0], N, C, -1)
        M = (B * v.reshape(1, N, C, -1)).sum(-1) if v is not None else B.sum(-1)
        sq = M * M
        sq = sq * f.w[..., None] if f.w is not None else sq
        t = sq.sum((0, 1))
        total = t if total is None else total + t
    if curv.diag is not None and not curv.shared:
        d = curv.diag.reshape(N, C, -1)
        t = (d * (v.reshape(N, C, -1) ** 2)).sum((0, 2)) if v is not None else d.sum((0, 2))
        total = t if total is None else total + t
    return total


class Linear(Rule):
    param_names = ("weight", "bias")

    def forward(self, x, values):
        if x.dim() != 2:
            raise Unsupported(f"{_where(self.name, self.module)} on an input of shape {tuple(x.shape)} (only [N, in])")
        W, b = values["weight"], values.get("bias")
        return F.linear(x, W, b), {"x": x, "W": W, "in": x.shape, "out": (x.shape[0], W.shape[0])}

    def back_columns(self, B, ctx):
        return B @ ctx["W"]

    def backward(self, curv, ctx):
        W = ctx["W"]
        factors = [Factor(f.B @ W, f.w) for f in curv.factors]
        shared = []
        for s in curv.shared:
            if s.s is None:
                shared.append(Shared(s.B @ W, s.r, None))
            else:
                factors.append(Factor((s.B.unsqueeze(1) * s.s.unsqueeze(0)) @ W, s.r.transpose(0, 1)))
        if curv.diag is not None:
            shared.append(Shared(W, curv.diag, None))
        return Curvature(factors=factors, shared=shared)

    def param_diag(self, curv, ctx, wanted):
        h = curv.diagonal()
        out = {}
        if "weight" in wanted:
            x = ctx["x"]
            out["weight"] = h.transpose(0, 1) @ (x * x)
        if "bias" in wanted:
            out["bias"] = h.sum(0)
        return out

    def param_trace(self, curv, ctx, wanted):
        h = curv.diagonal()
        parts = []
        if "weight" in wanted:
            x = ctx["x"]
            parts.append(h.sum(1) @ (x * x).sum(1))
        if "bias" in wanted:
            parts.append(h.sum())
        return sum(parts[1:], parts[0]) if parts else None


class Conv(Rule):
    """``Conv1d`` / ``Conv2d`` with ``groups=1`` and zero padding."""

    param_names = ("weight", "bias")

    def __init__(self, name, module):
        super().__init__(name, module)
        m = module
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise Unsupported(f"{_where(name, m)}: only groups=1, zero padding given as ints are supported")
        self.two_d = isinstance(m, nn.Conv2d)
        pad = (0,) * len(m.kernel_size) if isinstance(m.padding, str) else m.padding
        self.padding = pad

    def _geometry(self):
        m = self.module
        if self.two_d:
            return m.kernel_size, m.stride, self.padding, m.dilation
        return (1,) + m.kernel_size, (1,) + m.stride, (0,) + self.padding, (1,) + m.dilation

    def forward(self, x, values):
        m = self.module
        if x.dim() != (4 if self.two_d else 3):
            raise Unsupported(f"{_where(self.name, m)} on an unbatched input of shape {tuple(x.shape)}")
        W, b = values["weight"], values.get("bias")
        conv = F.conv2d if self.two_d else F.conv1d
        z = conv(x, W, b, m.stride, self.padding, m.dilation)
        return z, {"x": x, "W": W, "in": x.shape, "out": z.shape}

    def back_columns(self, B, ctx):
        K, N = B.shape[:2]
        m, x = self.module, ctx["x"]
        fold = B.reshape((K * N,) + B.shape[2:])
        size = (K * N,) + tuple(x.shape[1:])
        grad_in = torch.nn.grad.conv2d_input if self.two_d else torch.nn.grad.conv1d_input
        out = grad_in(size, ctx["W"], fold, m.stride, self.padding, m.dilation, 1)
        return out.reshape((K, N) + tuple(x.shape[1:]))

    def _unfold(self, x):
        k, s, p, d = self._geometry()
        x4 = x if self.two_d else x.unsqueeze(2)
        return F.unfold(x4, k, dilation=d, padding=p, stride=s)  # [N, Cin * prod(k), P]

    def param_diag(self, curv, ctx, wanted):
        out = {}
        W = ctx["W"]
        shape = ctx["out"]
        N, O = shape[0], shape[1]
        factors = curv.all_factors(shape) if curv.shared else curv.factors
        diag = None if curv.shared else curv.diag
        if "weight" in wanted:
            X = self._unfold(ctx["x"])
            total = None
            Xt = X.transpose(1, 2)  # [N, P, J]
            for f in factors:
                B = f.B.reshape(f.B.shape[0], N, O, -1)
                for k in range(B.shape[0]):  # one batched matmul per column: no permuted copy of B
                    M = torch.bmm(B[k], Xt)  # [N, O, J]
                    sq = M * M
                    t = (sq * f.w[k][:, None, None]).sum(0) if f.w is not None else sq.sum(0)
                    total = t if total is None else total + t
            if diag is not None:
                t = torch.einsum("nop,njp->oj", diag.reshape(N, O, -1), X * X)
                total = t if total is None else total + t
            if curv.pooled is not None:
                t = self._pooled_weight(curv.pooled, X, N, O)
                total = t if total is None else total + t
            out["weight"] = total.reshape(W.shape)
        if "bias" in wanted:
            b = None
            if factors or diag is not None:
                b = _channel_quadratic(Curvature(factors=factors, diag=diag), shape, None)
            if curv.pooled is not None:
                t = _channel_quadratic(Curvature(factors=curv.pooled[0]), curv.pooled[1].shape, None)
                b = t if b is None else b + t
            out["bias"] = b
        return out

    @staticmethod
    def _pooled_weight(pooled, X, N, O):
        """Weight diagonal from columns at a max pool's output: gather the unfolded input instead."""
        factors, idx = pooled
        J, P = X.shape[1], X.shape[2]
        Q = idx.shape[-1]  # idx: [N, O, Q]
        idx = idx.reshape(N, O, 1, Q).expand(N, O, J, Q)
        Xg = torch.gather(X.unsqueeze(1).expand(N, O, J, P), 3, idx)  # [N, O, J, Q]
        total = None
        for f in factors:
            K = f.B.shape[0]
            Bp = f.B.reshape(K, N, O, Q).permute(1, 2, 0, 3)  # [N, O, K, Q]
            M = Bp @ Xg.transpose(2, 3)  # [N, O, K, J]
            sq = M * M
            if f.w is not None:
                sq = sq * f.w.transpose(0, 1)[:, None, :, None]
            t = sq.sum((0, 2))
            total = t if total is None else total + t
        return total


class MaxPool(Rule):
    def forward(self, x, values):
        m = self.module
        if m.return_indices or x.dim() != 4:
            raise Unsupported(f"{_where(self.name, m)}: return_indices or unbatched input")
        z, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        return z, {"idx": idx, "in": x.shape, "out": z.shape}

    def back_columns(self, B, ctx):
        K, N, C = B.shape[:3]
        shape = ctx["in"]
        idx = ctx["idx"].reshape(1, N, C, -1).expand(K, N, C, -1)
        out = B.new_zeros((K, N, C, shape[2] * shape[3]))
        out.scatter_add_(3, idx, B.reshape(K, N, C, -1))
        return out.reshape((K,) + tuple(shape))


class ActivationPool(Rule):
    """An elementwise activation followed by ``MaxPool2d``, fused (the walker builds it).

    Max pooling scatters each output entry to one input position, so the
    activation's derivative can be gathered to the pooled resolution and applied
    before the scatter: ``diag(m) P^T B = P^T (gather(m) B)``, one pass over the
    smaller pooled columns instead of one over the full-resolution ones.
    """

    def __init__(self, act: "Activation", pool: "MaxPool"):
        super().__init__(f"{act.name}+{pool.name}", act.module)
        self.act, self.pool = act, pool
        self.has_residual = act.has_residual

    def forward(self, x, values):
        a, ctx_a = self.act.forward(x, {})
        z, ctx_p = self.pool.forward(a, {})
        N, C = z.shape[:2]
        mg = torch.gather(ctx_a["m"].reshape(N, C, -1), 2, ctx_p["idx"].reshape(N, C, -1)).reshape(z.shape)
        return z, {"in": x.shape, "out": z.shape, "a": ctx_a, "p": ctx_p, "mg": mg}

    def back_columns(self, B, ctx):
        return self.pool.back_columns(B * ctx["mg"], ctx["p"])

    def residual(self, g, ctx):
        return self.act.residual(self.pool.backward_grad(g, ctx["p"]), ctx["a"]) if self.has_residual else None

    def backward_pooled(self, curv, ctx):
        """The input curvature with the columns left at the pooled resolution (for a convolution's diagonal)."""
        N, C = ctx["out"][:2]
        cols = [Factor(f.B * ctx["mg"], f.w) for f in curv.factors]
        return Curvature(pooled=(cols, ctx["p"]["idx"].reshape(N, C, -1)))


class LinearMap(Rule):
    """Average pooling (plain and adaptive): linear, backward by ``vmap`` over ``vjp``."""

    def forward(self, x, values):
        if x.dim() != 4:
            raise Unsupported(f"{_where(self.name, self.module)} on an unbatched input of shape {tuple(x.shape)}")
        z, vjp_fn = vjp(self.module, x)
        return z, {"vjp": vjp_fn, "in": x.shape, "out": z.shape}

    def back_columns(self, B, ctx):
        return vmap(lambda b: ctx["vjp"](b)[0])(B)


def make_rule(name: str, module: nn.Module, hessian: bool) -> Rule:
    """The rule for a leaf ``module``, or :class:`Unsupported` naming it."""
    t = type(module)
    if t in (nn.Flatten, nn.Identity):
        return Reshape(name, module)
    if t is nn.Dropout:
        if module.training and module.p > 0:
            raise Unsupported(f"{_where(name, module)} is in training mode (call model.eval())")
        return Reshape(name, module)
    if t in activations.ACTIVATIONS:
        return Activation(name, module, hessian)
    if t is nn.Linear:
        return Linear(name, module)
    if t in (nn.Conv1d, nn.Conv2d):
        return Conv(name, module)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        return BatchNorm(name, module)
    if t is nn.MaxPool2d:
        return MaxPool(name, module)
    if t in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return LinearMap(name, module)
    raise Unsupported(f"{_where(name, module)} is not supported by the structured engine")


def fuse(rules: list) -> list:
    """Fuse each elementwise activation that directly feeds a ``MaxPool2d`` (see :class:`ActivationPool`)."""
    out = []
    for rule in rules:
        if isinstance(rule, MaxPool) and out and type(out[-1]) is Activation:
            out[-1] = ActivationPool(out[-1], rule)
        else:
            out.append(rule)
    return out
