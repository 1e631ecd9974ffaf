"""The per-sample factor of ``H_out``: the output-side half of a ``J^T H_out J`` curvature.

The GGN and both Fishers are ``J^T H_out J`` with ``H_out`` block diagonal over the
samples, and each block has a small factor::

    H_out[n] = sum_k w[k, n] B[k, n] B[k, n]^T        (B: [K, N, *feat], w: [K, N])

so that the curvature's diagonal is ``sum_n sum_k w[k, n] (J_n^T B[k, n])^2``: ``K``
vector-Jacobian products per sample (:mod:`secorder.operators.factor_diagonal`).
The columns come from the one place where each piece of math lives:

* GGN of a recognised loss (cross-entropy, MSE, BCE with logits): the closed-form
  factors the structured engine pulls back
  (:func:`secorder.structured.losses.output_curvature`; ``C`` columns
  ``sqrt(p_c) (e_c - p)`` per sample or position for cross-entropy, one weighted
  one-hot column per output entry for the diagonal MSE/BCE Hessians);
* GGN of any other loss: ``H_out`` by autograd (one loss HVP per output entry,
  :data:`MAX_DENSE_OUTPUT` entries at most), split into per-sample blocks when it
  is block diagonal and eigendecomposed (``w`` the eigenvalues' signs, ``B`` the
  eigenvectors times ``sqrt|lambda|``); otherwise one eigendecomposition of the
  whole ``H_out`` (``per_sample=False``: columns over the whole output);
* Monte-Carlo and empirical Fisher: the sampled or per-sample output gradients
  ``g`` of :mod:`secorder.losses` (``K = mc_samples`` or ``1``), with
  ``w = 1 / (K c)``: the same tensor the operators' products use, so one call's
  labels are the same for products and diagonal.

References:
    Dangel, F., Kunstner, F., Hennig, P. (2020). BackPACK: Packing more into backprop.
    ICLR (the loss-Hessian square roots). Schraudolph, N. N. (2002). Fast curvature
    matrix-vector products for second-order gradient descent. Neural Computation 14(7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from ..losses import LossSpec, UnsupportedLoss

__all__ = ["OutputFactor", "MAX_DENSE_OUTPUT", "closed_form_factor", "autograd_factor", "ggn_factor"]

#: Output entries up to which a custom loss's ``H_out`` is formed densely (and factored) by autograd;
#: above it the GGN's diagonal of such a loss keeps the one-hot columns.
MAX_DENSE_OUTPUT = 4096


Columns = Callable[[int, int], Tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class OutputFactor:
    """``H_out = sum_k w[k] B[k] B[k]^T`` per sample (see the module docstring); also the map ``u -> H_out u``.

    The columns are made a range at a time (``columns_between(start, stop)``), so a
    factor of many columns (a language model's ``C T`` per sequence) is never held whole.

    Fields:
        columns: ``K``, the columns per sample.
        columns_between: ``(start, stop) -> (B, w)``: columns ``B`` ``[k, N, *feat]`` and
            weights ``w`` ``[k, N]`` (``per_sample=False``: ``[k, *out.shape]`` and ``[k]``).
        per_sample: the blocks are per sample (column ``k`` of sample ``n`` lives on sample ``n``).
        unbatch: the output has no batch dimension (one sample, ``N = 1`` in ``B``).
        source: how the columns were made (reported by the diagonal's route).

    Example:
        >>> import torch
        >>> fac = OutputFactor.of(torch.tensor([[[1., 0.], [0., 2.]]]), torch.ones(1, 2))   # one column, two samples
        >>> fac(torch.ones(2, 2))
        tensor([[1., 0.],
                [0., 4.]])
    """

    columns: int
    columns_between: Columns
    per_sample: bool = True
    unbatch: bool = False
    source: str = ""

    @staticmethod
    def of(B: Tensor, w: Tensor, *, per_sample: bool = True, unbatch: bool = False, source: str = "") -> "OutputFactor":
        """A factor whose columns ``B`` and weights ``w`` are given whole."""
        return OutputFactor(B.shape[0], lambda start, stop: (B[start:stop], w[start:stop]), per_sample, unbatch,
                            source)

    def __call__(self, u: Tensor) -> Tensor:
        """``H_out u`` for one output tangent ``u``."""
        B, w = self.columns_between(0, self.columns)
        if self.unbatch:
            u = u[None]
        feat = list(range(2 if self.per_sample else 1, B.dim()))
        s = (B * u[None]).sum(dim=feat) if feat else B * u[None]  # [K, N] or [K]
        sw = s * w
        out = (B * sw.reshape(tuple(sw.shape) + (1,) * (B.dim() - sw.dim()))).sum(0)
        return out[0] if self.unbatch else out


def _concatenated(parts: List[Tuple[int, Columns]]) -> Columns:
    """Column ranges of several factors, one after the other, as one."""

    def between(start: int, stop: int) -> Tuple[Tensor, Tensor]:
        Bs, ws, offset = [], [], 0
        for count, part in parts:
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if lo < hi:
                B, w = part(lo, hi)
                Bs.append(B)
                ws.append(w)
            offset += count
        return (Bs[0], ws[0]) if len(Bs) == 1 else (torch.cat(Bs), torch.cat(ws))

    return between


def _weights(fac: Any) -> Tensor:
    B = fac.B
    return torch.ones(B.shape[:2], dtype=B.dtype, device=B.device) if fac.w is None else fac.w


def closed_form_factor(spec: LossSpec, out: Tensor, targets: Any) -> OutputFactor:
    """The GGN's factor of a recognised loss, from the structured engine's closed forms.

    Raises:
        UnsupportedLoss: outputs or targets the closed forms do not cover.

    Example:
        >>> import torch
        >>> fac = closed_form_factor(LossSpec("mse", "sum"), torch.zeros(2, 3), torch.ones(2, 3))
        >>> fac.columns, fac(torch.ones(2, 3))      # H_out = 2 I per sample
        (3, tensor([[2., 2., 2.],
                [2., 2., 2.]]))
    """
    from ..structured.errors import Unsupported  # the engine's math, read only
    from ..structured.losses import output_curvature

    try:
        oc = output_curvature(spec, out, targets)
        parts: List[Tuple[int, Columns]] = []
        for term in oc.terms:  # whole terms (the diagonal MSE/BCE Hessians): one-hot columns, an expanded view
            fac = term.as_factor()
            B, w = fac.B, _weights(fac)
            parts.append((B.shape[0], lambda start, stop, B=B, w=w: (B[start:stop], w[start:stop])))
        if oc.columns:
            P = oc.positions  # explicit columns per factor column (per position of a language model)

            def factor_columns(start: int, stop: int) -> Tuple[Tensor, Tensor]:
                c0, c1 = start // P, -(-stop // P)
                fac = oc.factor(c0, c1).as_factor()
                lo, hi = start - c0 * P, stop - c0 * P
                return fac.B[lo:hi], _weights(fac)[lo:hi]

            parts.append((oc.columns * P, factor_columns))
    except Unsupported as err:
        raise UnsupportedLoss(str(err)) from None
    if not parts:
        raise UnsupportedLoss("the loss has no output curvature terms")
    K = sum(count for count, _ in parts)
    return OutputFactor(K, _concatenated(parts), source=f"closed-form {spec.kind} factor, {K} column(s) per sample")


def _dense_output_hessian(loss_of_output: Callable[[Tensor], Tensor], out: Tensor) -> Tensor:
    """``H_out`` as an ``[M, M]`` matrix (``M = out.numel()``), one batched loss HVP per entry."""
    M = out.numel()
    _, hvp = vjp(grad(loss_of_output), out)
    eye = torch.eye(M, dtype=out.dtype, device=out.device).reshape((M,) + tuple(out.shape))
    return vmap(lambda e: hvp(e)[0])(eye).reshape(M, M)


def _eig_columns(H: Tensor) -> Tuple[Tensor, Tensor]:
    """``H = sum_k w_k b_k b_k^T`` for symmetric ``H`` (batched over leading dims): ``(b, w)``, ``b`` columns last."""
    lam, Q = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    return Q * lam.abs().sqrt().unsqueeze(-2), torch.sign(lam)


def autograd_factor(loss_of_output: Callable[[Tensor], Tensor], out: Tensor) -> Optional[OutputFactor]:
    """The GGN's factor of any loss, by autograd and an eigendecomposition; ``None`` above :data:`MAX_DENSE_OUTPUT`.

    Example:
        >>> import torch
        >>> fac = autograd_factor(lambda o: (o ** 4).sum() / 12, torch.tensor([[1.], [2.]]))
        >>> fac.per_sample, fac(torch.ones(2, 1))   # H_out = diag(o^2), block diagonal over the samples
        (True, tensor([[1.],
                [4.]]))
    """
    M = out.numel()
    if M == 0 or M > MAX_DENSE_OUTPUT or out.dim() == 0:
        return None
    H = _dense_output_hessian(loss_of_output, out.detach())
    N = out.shape[0]
    Fn = M // N
    blocks = H.reshape(N, Fn, N, Fn)
    same = torch.eye(N, dtype=torch.bool, device=H.device).reshape(N, 1, N, 1)
    if not bool((blocks.masked_fill(same, 0) == 0).all()):  # samples coupled by the loss: whole-output columns
        b, w = _eig_columns(H)
        return OutputFactor.of(b.T.reshape((M,) + tuple(out.shape)), w, per_sample=False,
                               source=f"autograd H_out ({M}x{M}, couples samples), {M} whole-output column(s)")
    diag_blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [N, Fn, Fn]
    b, w = _eig_columns(diag_blocks)  # [N, Fn, K=Fn], [N, K]
    B = b.permute(2, 0, 1).reshape((Fn,) + tuple(out.shape))
    return OutputFactor.of(B, w.T, source=f"autograd H_out per sample ({Fn}x{Fn} eigendecomposition), "
                                       f"{Fn} column(s) per sample")


def ggn_factor(problem: Any, out: Any) -> Optional[OutputFactor]:
    """The GGN's factor for the call ``problem`` at the model output ``out``, or ``None`` (no factor: one-hot columns).

    Closed forms for the recognised losses, autograd otherwise (see the module docstring).
    """
    from ..losses import loss_spec
    from ._samples import batched

    if not isinstance(out, Tensor):
        return None
    try:
        spec = loss_spec(problem.loss_fn)
        out_b, targets, unbatch = batched(spec, out, problem.targets)
        fac = closed_form_factor(spec, out_b, targets)
        return OutputFactor(fac.columns, fac.columns_between, True, unbatch, fac.source) if unbatch else fac
    except UnsupportedLoss:
        pass
    if out.dim() == 0:
        return None
    return autograd_factor(problem.loss_of_output, out)
