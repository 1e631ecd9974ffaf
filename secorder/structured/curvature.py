"""Per-sample curvature with respect to one intermediate tensor, as a sum of terms.

For a tensor ``z`` of shape ``[N, *feat]`` the loss Hessian with respect to
``z`` is block diagonal over the ``N`` samples. A :class:`Curvature` keeps its
per-sample blocks as a sum of terms, each of a kind chosen so that the
quantities rules need stay cheap:

* :class:`Factor` ``(B, w)``: ``sum_k w[k, n] B[k, n] B[k, n]^T`` with columns
  ``B`` of shape ``[K, N, *feat]`` (``w=None`` means all ones). The loss-output
  factorisations (the generalized Gauss-Newton part) enter as factors.
* :class:`Diagonal` ``d``: ``diag(d[n])`` with ``d`` of shape ``[N, *feat]``;
  the residual term of an elementwise activation is of this kind, and so is the
  output Hessian of the MSE and BCE losses.
* :class:`Shared` ``(B, r, s)``: ``diag(s[n]) B^T diag(r[n]) B diag(s[n])`` with
  sample-independent rows ``B`` of shape ``[K, *feat]``, per-sample weights
  ``r`` ``[N, K]`` and an optional per-sample column scaling ``s``
  ``[N, *feat]``. A diagonal term pulled back through a linear layer ``W``
  becomes ``Shared(W, d)``; an elementwise activation then only updates ``s``.
  Its diagonal, ``s**2 * (r @ B**2)``, costs one small matmul instead of ``K``
  factor columns per sample.
* :class:`Gathered` ``(factor, index, shape)``: factor columns left at a max
  pool's output resolution; the columns at the pool's input are their
  scatter-add to the positions ``index``. Elementwise Jacobians multiply the
  short columns, and a convolution reads its parameter diagonal by gathering its
  unfolded input instead of scattering the columns (the scatter happens only if
  the curvature is pulled further back).

Rules never look at the kinds: they read :meth:`Curvature.diagonal` and
:meth:`Curvature.quadratic`, and pull a curvature back through their Jacobian
with :meth:`Curvature.pulled` (each :class:`~secorder.structured.jacobians.Jacobian`
says how each kind goes through it, with explicit columns as the default).

This is the Hessian backpropagation of Dangel, Harmeling and Hennig,
"Modular Block-diagonal Curvature Approximations for Feedforward
Architectures" (AISTATS 2020), in the exact-diagonal form of Dangel, Kunstner
and Hennig, "BackPACK: Packing more into backprop" (ICLR 2020), with the
residual terms kept as diagonals instead of signed factor columns.

Every operation is out of place and free of host synchronisation, so a sweep
runs under ``torch.func.vmap``/``grad`` (batching rules, any derivative order)
and traces under ``torch.compile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .jacobians import Jacobian

__all__ = ["Term", "Factor", "SampledFactor", "SoftmaxFactor", "Diagonal", "Shared", "Gathered", "Curvature"]


def _split_channels(t: Tensor, lead: int, positions: int) -> Tensor:
    """View the feature dims of ``t`` (after ``lead`` leading dims) as ``[channels, positions]``."""
    channels = math.prod(t.shape[lead:]) // positions if positions else -1  # explicit: N may be 0
    return t.reshape(tuple(t.shape[:lead]) + (channels, positions))


_SMALL = 2 ** 20  # entries up to which a factor's diagonal is one reduction over the columns


class _FactorDiagonal(torch.autograd.Function):
    """``sum_k w[k] * B[k]**2``: column by column forward, one fused backward.

    Accumulating column by column is far faster on CPU than a reduction over
    the leading dimension (no ``K``-fold temporary); as a plain loop, though,
    its backward would be ``K`` separate nodes. The backward is written in
    differentiable tensor operations, so derivatives of any order and
    ``torch.func`` transforms go through it (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(B: Tensor, w: Optional[Tensor]) -> Tensor:
        extra = (1,) * (B.dim() - 2)
        cols = B.unbind(0)
        ws = [None] * len(cols) if w is None else [c.reshape(c.shape + extra) for c in w.unbind(0)]
        out = None
        for b, wk in zip(cols, ws):
            bw = b if wk is None else b * wk
            out = bw * b if out is None else torch.addcmul(out, bw, b)
        return out if out is not None else B.new_zeros(B.shape[1:])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Tensor, Optional[Tensor]], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        B, w = ctx.saved_tensors
        extra = (1,) * (B.dim() - 2)
        gB = gw = None
        if ctx.needs_input_grad[0]:
            gB = 2 * B * grad if w is None else 2 * B * grad * w.reshape(w.shape + extra)
        if w is not None and ctx.needs_input_grad[1]:
            gw = (B * B * grad).flatten(2).sum(-1)
        return gB, gw


class Term:
    """One kind of per-sample curvature term. Subclasses are the kinds listed in the module docstring."""

    def diagonal(self) -> Tensor:
        """The diagonal of every sample's block, shaped like the tensor (``[N, *feat]``)."""
        raise NotImplementedError

    def quadratic(self, X: Tensor) -> Tensor:
        """Channel-block quadratic forms: see :meth:`Curvature.quadratic`."""
        return self.as_factor().quadratic(X)

    def as_factor(self) -> "Factor":
        """The same matrices as explicit per-sample columns."""
        raise NotImplementedError

    def pulled(self, jac: "Jacobian") -> "Term":
        """``J_n^T H_n J_n`` for every sample: how this term goes through ``jac``."""
        raise NotImplementedError


@dataclass
class Factor(Term):
    """``sum_k w[k, n] B[k, n] B[k, n]^T`` per sample; ``B``: ``[K, N, *feat]``, ``w``: ``[K, N]`` or None."""

    B: Tensor
    w: Optional[Tensor] = None

    def diagonal(self) -> Tensor:
        B, w = self.B, self.w
        if B.numel() <= _SMALL:  # small: two plain kernels (and two cheap backward nodes)
            sq = B * B if w is None else B * B * w.reshape(tuple(w.shape) + (1,) * (B.dim() - 2))
            return sq.sum(0)
        return _FactorDiagonal.apply(B, w)

    def quadratic(self, X: Tensor) -> Tensor:
        K, N = self.B.shape[:2]
        S, J = X.shape[-1], X.shape[-2]
        B = _split_channels(self.B, 2, S)  # [K, N, C, S]
        C = B.shape[2]
        X = X.expand((N,) + tuple(X.shape[1:]))
        if K == 0:
            return B.new_zeros((C, J))
        if X.shape[1] == 1:
            # One test matrix for every channel (a convolution's unfolded input):
            # one batched matmul per column, no permuted copy of the columns.
            Xt = X[:, 0].transpose(1, 2)  # [N, S, J]
            ws = [None] * K if self.w is None else self.w.unbind(0)
            total = None
            for b, w in zip(B.unbind(0), ws):  # unbind, not B[k]: one backward node, not K full-size ones
                M = torch.bmm(b, Xt)  # [N, C, J]
                sq = M * M if w is None else M * M * w.reshape(N, 1, 1)
                t = sq.sum(0)
                total = t if total is None else total + t
            return total
        if J == 1:
            M = (B * X[:, :, 0]).sum(-1)  # [K, N, C]
            sq = M * M if self.w is None else M * M * self.w[..., None]
            return sq.sum((0, 1)).unsqueeze(1)
        M = B.permute(1, 2, 0, 3) @ X.transpose(2, 3)  # [N, C, K, J]
        sq = M * M if self.w is None else M * M * self.w.transpose(0, 1)[:, None, :, None]
        return sq.sum((0, 2))

    def as_factor(self) -> "Factor":
        return self

    def pulled(self, jac: "Jacobian") -> Term:
        return jac.pull_factor(self)


@dataclass
class SampledFactor(Factor):
    """A :class:`Factor` whose columns are independent zero-mean draws, one set per row.

    The Monte-Carlo Fisher's sampled output gradients: ``E[g] = 0`` for labels drawn
    from the model's predictive distribution. Only
    :class:`~secorder.structured.tokens.FlattenBatch` reads the mark: rows that are
    tokens of one sequence may then be summed into one column per sequence (see
    :class:`~secorder.structured.tokens.Tokenwise`); everywhere else it is a factor.
    """


@dataclass
class SoftmaxFactor(Term):
    """The softmax cross-entropy factor, columns ``start:start+K``, without materialising them.

    Column ``k`` of sample ``n`` is ``a[k, n] (e_c - p[n])`` with ``c = start + k``
    (``p``: ``[N, C]`` probabilities, ``a``: ``[K, N]``), weighted by ``w``
    (``[K, N]`` or None) as in :class:`Factor`. The diagonal has a closed form
    (``O(N C)`` instead of ``O(K N C)``), and a linear layer pulls the columns
    back as ``a (W[c] - p W)`` without forming them at the output
    (``Dense.pull_softmax``); any other Jacobian gets them explicitly
    (:meth:`as_factor`).
    """

    a: Tensor
    p: Tensor
    start: int
    w: Optional[Tensor] = None

    def _weights(self) -> Tensor:
        return self.a * self.a if self.w is None else self.a * self.a * self.w

    def diagonal(self) -> Tensor:
        # d[n, j] = sum_k ww[k, n] (delta(c_k, j) - p[n, j])^2
        ww = self._weights()  # [K, N]
        K, C = ww.shape[0], self.p.shape[1]
        own = ww.transpose(0, 1)  # [N, K]: the weight of each column at its own class
        if K != C:
            own = torch.nn.functional.pad(own, (self.start, C - self.start - K))
        return own * (1 - 2 * self.p) + self.p * self.p * ww.sum(0).unsqueeze(1)

    def as_factor(self) -> Factor:
        K, C = self.a.shape[0], self.p.shape[1]
        eye = torch.eye(C, dtype=self.p.dtype, device=self.p.device)[self.start:self.start + K]
        B = (self.a.unsqueeze(2) * (eye.unsqueeze(1) - self.p.unsqueeze(0))).contiguous()
        return Factor(B, self.w)

    def pulled(self, jac: "Jacobian") -> Term:
        pull = getattr(jac, "pull_softmax", None)
        return jac.pull_factor(self.as_factor()) if pull is None else pull(self)


@dataclass
class Diagonal(Term):
    """``diag(d[n])`` per sample; ``d``: ``[N, *feat]``."""

    d: Tensor

    def diagonal(self) -> Tensor:
        return self.d

    def quadratic(self, X: Tensor) -> Tensor:
        S = X.shape[-1]
        N = self.d.shape[0]
        d = _split_channels(self.d, 1, S)  # [N, C, S]
        X2 = X * X
        if X.shape[1] == 1:
            return torch.einsum("ncs,njs->cj", d, X2[:, 0].expand((N,) + tuple(X2.shape[2:])))
        return torch.einsum("ncs,ncjs->cj", d, X2.expand((N,) + tuple(X2.shape[1:])))

    def as_factor(self) -> Factor:
        # One one-hot column per feature, weighted by the diagonal.
        shape = tuple(self.d.shape)
        N, F = shape[0], math.prod(shape[1:])
        eye = torch.eye(F, dtype=self.d.dtype, device=self.d.device)
        B = eye.reshape((F, 1) + shape[1:]).expand((F, N) + shape[1:])
        return Factor(B, self.d.reshape(N, F).transpose(0, 1))

    def pulled(self, jac: "Jacobian") -> Term:
        return jac.pull_diagonal(self)


@dataclass
class Shared(Term):
    """``diag(s_n) B^T diag(r_n) B diag(s_n)``; ``B``: ``[K, *feat]``, ``r``: ``[N, K]``, ``s``: ``[N, *feat]`` or None."""

    B: Tensor
    r: Tensor
    s: Optional[Tensor] = None

    def diagonal(self) -> Tensor:
        K = self.B.shape[0]
        d = (self.r @ (self.B * self.B).reshape(K, -1)).reshape((self.r.shape[0],) + tuple(self.B.shape[1:]))
        return d if self.s is None else d * self.s * self.s

    def as_factor(self) -> Factor:
        N = self.r.shape[0]
        B = self.B.unsqueeze(1)
        B = B * self.s.unsqueeze(0) if self.s is not None else B.expand((B.shape[0], N) + tuple(B.shape[2:]))
        return Factor(B, self.r.transpose(0, 1))

    def pulled(self, jac: "Jacobian") -> Term:
        return jac.pull_shared(self)


# Relative costs per entry (nanoseconds on one CPU thread, measured on the benchmark's CNN
# rows): writing a scattered column entry, a multiply-add of a matmul against test vectors
# shared by every channel, gathering a test-vector entry, and a multiply-add against
# gathered (per-channel) test vectors.
_SCATTER, _SHARED_MAC, _GATHER, _GATHERED_MAC = 3.0, 0.035, 0.9, 0.46


def _scatter_is_cheaper(K: int, J: int, P: int, Q: int) -> bool:
    """Whether ``K`` pooled columns (``Q`` of ``P`` positions) read ``J`` test vectors shared by every
    channel faster scattered to full size (``K P (scatter + J shared MACs)``) than through test
    vectors gathered for every channel (``Q J (gather + K gathered MACs)``), per sample and channel.

    Example:
        >>> _scatter_is_cheaper(1, 144, 121, 25), _scatter_is_cheaper(10, 9, 676, 169)
        (True, False)
    """
    return K * P * (_SCATTER + _SHARED_MAC * J) < Q * J * (_GATHER + _GATHERED_MAC * K)


@dataclass
class Gathered(Term):
    """Columns at a max pool's output; their value at the pool's input is a scatter-add.

    ``factor.B``: ``[K, N, C, *pooled]``; ``index``: ``[N, C, Q]`` (``Q`` pooled
    positions) into the flattened positions of the pool's input, whose shape is
    ``shape`` (``[N, C, *pos]``). Repeated indices (overlapping windows) add up.
    """

    factor: Factor
    index: Tensor
    shape: Tuple[int, ...]

    def diagonal(self) -> Tensor:
        return self.as_factor().diagonal()

    def quadratic(self, X: Tensor) -> Tensor:
        N, C, Q = self.index.shape
        P = X.shape[-1]
        K, J = self.factor.B.shape[0], X.shape[-2]
        if P != math.prod(self.shape[2:]) or (X.shape[1] == 1 and _scatter_is_cheaper(K, J, P, Q)):
            return self.as_factor().quadratic(X)
        J = X.shape[-2]
        X = X.expand((N, C, J, P))
        idx = self.index.unsqueeze(2).expand(N, C, J, Q)
        Xg = torch.gather(X, 3, idx)  # [N, C, J, Q]: the test vectors read at the pooled positions
        f = Factor(self.factor.B.reshape(self.factor.B.shape[:3] + (Q,)), self.factor.w)
        return f.quadratic(Xg)

    def as_factor(self) -> Factor:
        B = self.factor.B
        K, (N, C, Q) = B.shape[0], self.index.shape
        P = math.prod(self.shape[2:])
        idx = self.index.unsqueeze(0).expand(K, N, C, Q)
        full = B.new_zeros((K, N, C, P)).scatter_add(3, idx, B.reshape(K, N, C, Q))
        return Factor(full.reshape((K,) + tuple(self.shape)), self.factor.w)

    def pulled(self, jac: "Jacobian") -> Term:
        return jac.pull_gathered(self)


@dataclass
class Curvature:
    """The per-sample Hessian blocks w.r.t. a tensor of shape ``[N, *feat]``, as a sum of terms.

    Example:
        >>> import torch
        >>> c = Curvature([Factor(torch.ones(2, 1, 3)), Diagonal(torch.ones(1, 3))])
        >>> c.diagonal()
        tensor([[3., 3., 3.]])
        >>> c.quadratic(torch.ones(1, 1, 1, 3))  # one channel of 3 positions, the all-ones vector
        tensor([[21.]])
    """

    terms: List[Term] = field(default_factory=list)

    def diagonal(self) -> Tensor:
        """The diagonal of every sample's block, shaped like the tensor (``[N, *feat]``)."""
        if not self.terms:
            raise ValueError("empty curvature")
        out = self.terms[0].diagonal()
        for t in self.terms[1:]:
            out = out + t.diagonal()
        return out

    def quadratic(self, X: Tensor) -> Tensor:
        """``Q[c, j] = sum_n X[n, c, j]^T H_n[c, c] X[n, c, j]`` over the diagonal channel blocks.

        The tensor's features are viewed as ``[C, S]`` (channels, positions),
        ``S = X.shape[-1]``; ``H_n[c, c]`` is the ``S x S`` block of channel
        ``c``. ``X`` has shape ``[N, C, J, S]``, where ``N`` and ``C`` may be 1
        (the same test vectors for every sample or channel). This is the parameter
        diagonal of every module linear in its parameters: ``X[n, c, j]`` is the
        output's derivative, within channel ``c``, with respect to parameter
        ``(c, j)``. Returns ``[C, J]``.
        """
        if not self.terms:
            raise ValueError("empty curvature")
        out = self.terms[0].quadratic(X)
        for t in self.terms[1:]:
            out = out + t.quadratic(X)
        return out

    def pulled(self, jac: "Jacobian") -> "Curvature":
        """The curvature at the input of a module with Jacobian ``jac``; term ``i`` comes from term ``i``."""
        return Curvature([t.pulled(jac) for t in self.terms])

    def columns(self) -> List[Factor]:
        """Every term as explicit columns."""
        return [t.as_factor() for t in self.terms]

    def plus(self, term: Optional[Term]) -> "Curvature":
        """This curvature with ``term`` added (``None`` adds nothing)."""
        return self if term is None else Curvature(self.terms + [term])
