"""Per-sample curvature with respect to one intermediate tensor, in factored form.

For a tensor ``z`` of shape ``[N, *feat]`` the loss Hessian with respect to
``z`` is block diagonal over the ``N`` samples. Its per-sample blocks are kept
as a sum of three kinds of terms, each chosen so that the diagonal and the
backward step through a module stay cheap:

* :class:`Factor` ``(B, w)``: ``sum_k w[k, n] B[k, n] B[k, n]^T`` with columns
  ``B`` of shape ``[K, N, *feat]`` (``w=None`` means all ones). The loss-output
  factorisations (the generalized Gauss-Newton part) enter as factors.
* ``diag`` ``d``: ``diag(d[n])`` with ``d`` of shape ``[N, *feat]``; the
  residual term of an elementwise activation is of this kind, and so is the
  output Hessian of the MSE and BCE losses.
* :class:`Shared` ``(B, r, s)``: ``diag(s[n]) B^T diag(r[n]) B diag(s[n])`` with
  sample-independent rows ``B`` of shape ``[K, *feat]``, per-sample weights
  ``r`` ``[N, K]`` and an optional per-sample column scaling ``s``
  ``[N, *feat]``. A diagonal term pulled back through a linear layer ``W``
  becomes ``Shared(W, d, None)``; an elementwise activation then only updates
  ``s``. Its diagonal, ``s**2 * (r @ B**2)``, costs one small matmul instead of
  ``K`` factor columns per sample (the columns BackPACK would add per hidden
  unit).

This is the Hessian backpropagation of Dangel, Harmeling and Hennig,
"Modular Block-diagonal Curvature Approximations for Feedforward
Architectures" (AISTATS 2020), in the exact-diagonal form of Dangel, Kunstner
and Hennig, "BackPACK: Packing more into backprop" (ICLR 2020), with the
residual terms kept as diagonals instead of signed factor columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Factor", "Shared", "Curvature"]


@dataclass
class Factor:
    """``sum_k w[k, n] B[k, n] B[k, n]^T`` per sample; ``B``: ``[K, N, *feat]``, ``w``: ``[K, N]`` or None."""

    B: Tensor
    w: Optional[Tensor] = None

    def diagonal(self) -> Tensor:
        # Accumulate column by column: far faster on CPU than a reduction over the leading dim.
        B, w = self.B, self.w
        extra = (1,) * (B.dim() - 2)
        out = B[0] * B[0] if w is None else B[0] * B[0] * w[0].reshape(w.shape[1:] + extra)
        for k in range(1, B.shape[0]):
            out = out.addcmul_(B[k], B[k]) if w is None else out.addcmul_(B[k] * w[k].reshape(w.shape[1:] + extra), B[k])
        return out


@dataclass
class Shared:
    """``diag(s_n) B^T diag(r_n) B diag(s_n)``; ``B``: ``[K, *feat]``, ``r``: ``[N, K]``, ``s``: ``[N, *feat]`` or None."""

    B: Tensor
    r: Tensor
    s: Optional[Tensor] = None

    def diagonal(self) -> Tensor:
        K = self.B.shape[0]
        d = (self.r @ (self.B * self.B).reshape(K, -1)).reshape((self.r.shape[0],) + self.B.shape[1:])
        return d if self.s is None else d * self.s * self.s

    def to_factor(self) -> Factor:
        """The same matrices as explicit per-sample columns (``K`` columns per sample)."""
        N = self.r.shape[0]
        B = self.B.unsqueeze(1)
        B = B * self.s.unsqueeze(0) if self.s is not None else B.expand((B.shape[0], N) + B.shape[2:])
        return Factor(B, self.r.transpose(0, 1))


@dataclass
class Curvature:
    """The per-sample Hessian blocks w.r.t. a tensor of shape ``[N, *feat]``, as a sum of terms.

    Example:
        >>> import torch
        >>> c = Curvature(factors=[Factor(torch.ones(2, 1, 3))], diag=torch.ones(1, 3))
        >>> c.diagonal()
        tensor([[3., 3., 3.]])
    """

    factors: List[Factor] = field(default_factory=list)
    diag: Optional[Tensor] = None
    shared: List[Shared] = field(default_factory=list)
    # Columns left at a max pool's output resolution, with the pool's argmax indices
    # ([N, C, Q] into the flattened input positions): only a convolution's parameter
    # diagonal reads them (see rules.Conv), which then never scatters them to full size.
    pooled: Optional[Tuple[List[Factor], Tensor]] = None

    def diagonal(self) -> Tensor:
        """The diagonal of every sample's block, shaped like the tensor (``[N, *feat]``)."""
        parts = [f.diagonal() for f in self.factors] + [s.diagonal() for s in self.shared]
        if self.diag is not None:
            parts.append(self.diag)
        if not parts:
            raise ValueError("empty curvature")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def add_diag(self, d: Tensor) -> None:
        self.diag = d if self.diag is None else self.diag + d

    def all_factors(self, shape) -> List[Factor]:
        """Every term as explicit columns (diagonal terms become one-hot columns); ``shape`` is ``[N, *feat]``."""
        out = list(self.factors) + [s.to_factor() for s in self.shared]
        if self.diag is not None:
            N, F = shape[0], self.diag[0].numel()
            eye = torch.eye(F, dtype=self.diag.dtype, device=self.diag.device)
            B = eye.reshape((F, 1) + tuple(shape[1:])).expand((F, N) + tuple(shape[1:]))
            out.append(Factor(B, self.diag.reshape(N, F).transpose(0, 1)))
        return out

    def is_empty(self) -> bool:
        return not self.factors and not self.shared and self.diag is None
