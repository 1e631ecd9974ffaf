"""Shared by the Fisher operators: the recognised loss and the per-sample outer-product map.

Both Fishers are ``(1/c) sum_n J_n^T (sum_k w_k g_nk g_nk^T) J_n`` for per-sample
output vectors ``g_nk`` (one per draw for the Monte-Carlo Fisher, the gradient for
the empirical Fisher); :func:`outer_product_map` is that map on the output.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch import Tensor

from ..losses import LossSpec, UnsupportedLoss, SUPPORTED_LOSSES, loss_spec

__all__ = ["recognised_loss", "batched", "outer_product_map", "sample_factor"]


def recognised_loss(problem: Any, curvature: str) -> LossSpec:
    """The spec of the call's loss, or a ``ValueError`` naming the supported losses."""
    try:
        return loss_spec(problem.loss_fn)
    except UnsupportedLoss as err:
        raise UnsupportedLoss(
            f"curvature={curvature!r} needs the loss's predictive distribution, known for {SUPPORTED_LOSSES}: {err}"
        ) from None


def batched(spec: LossSpec, out: Tensor, targets: Any) -> Tuple[Tensor, Any, bool]:
    """Cross-entropy on one unbatched sample (logits ``[C]``) as a batch of one."""
    if not isinstance(out, Tensor):
        raise UnsupportedLoss(f"the model output must be a tensor for these curvatures, got {type(out).__name__}")
    if spec.kind == "ce" and out.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0:
        return out[None], targets[None], True
    return out, targets, False


def outer_product_map(G: Tensor, scale: Tensor, unbatch: bool) -> Callable[[Tensor], Tensor]:
    """``u -> scale * sum_k G_k <G_k, u>_n`` over the leading draw dim ``k`` of ``G`` ``[K, N, *feat]``.

    ``<., .>_n`` is the inner product within sample ``n``.

    Example:
        >>> import torch
        >>> G = torch.tensor([[[1., 0.], [0., 2.]]])          # one draw, two samples
        >>> outer_product_map(G, torch.tensor(1.), False)(torch.ones(2, 2))
        tensor([[1., 0.],
                [0., 4.]])
    """
    K, N = G.shape[0], G.shape[1]
    feat_dims = list(range(2, G.dim()))

    def h(u: Tensor) -> Tensor:
        if unbatch:
            u = u[None]
        s = (G * u[None]).sum(dim=feat_dims, keepdim=True) if feat_dims else G * u[None]  # [K, N, 1, ...]
        w = (G * s).sum(0) * scale
        return w[0] if unbatch else w

    return h


def sample_factor(G: Tensor, scale: Tensor, unbatch: bool, what: str):
    """``G`` ``[K, N, *feat]`` with weight ``scale`` as the Fishers' per-sample factor of ``H_out``.

    The same tensor serves the products (it is the map ``u -> scale sum_k G_k <G_k, u>_n``)
    and the exact diagonal, so one call's labels are the same for both.

    Example:
        >>> import torch
        >>> fac = sample_factor(torch.tensor([[[1., 0.], [0., 2.]]]), torch.tensor(1.), False, "g")
        >>> fac(torch.ones(2, 2)), fac.source
        (tensor([[1., 0.],
                [0., 4.]]), 'g')
    """
    from .output_factor import OutputFactor

    w = torch.as_tensor(scale, dtype=G.dtype, device=G.device).expand(G.shape[:2])
    return OutputFactor.of(G, w, per_sample=True, unbatch=unbatch, source=what)
