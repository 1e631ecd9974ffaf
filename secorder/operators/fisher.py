"""The Monte-Carlo Fisher: ``(1/(M c)) sum_n sum_m J_n^T g_nm g_nm^T J_n``.

``g_nm`` is the gradient of the per-sample loss for a label ``y~_nm`` drawn from the
model's predictive distribution at the primal point (``M = mc_samples`` draws per
sample, :func:`secorder.losses.sample_output_gradients`); ``c`` is the loss's
reduction factor. In expectation over the labels it is the GGN, for the
recognised losses (cross-entropy, MSE, BCE with logits), whose predictive
distributions are known; it is what K-FAC, natural-gradient and Laplace users
sample. The labels are drawn once, when the operator is made, from ``generator``
(the global RNG when ``None``): every product of one call sees the same labels.
Scale conventions are those of curvlinops' ``FisherMCLinearOperator``.

Reference:
    Martens, J. (2020). New insights and perspectives on the natural gradient method.
    JMLR 21(146). Kunstner, F., Hennig, P., Balles, L. (2019). Limitations of the
    empirical Fisher approximation for natural gradient descent. NeurIPS.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..losses import reduction_factor, sample_output_gradients
from ._samples import batched, recognised_loss, sample_factor
from .base import LeafOperator
from .gauss_newton import gauss_newton_operator

__all__ = ["build"]


def build(problem: Any, *, mc_samples: int = 1, generator: Optional[torch.Generator] = None) -> LeafOperator:
    """The Monte-Carlo Fisher of the call's ``f`` (registered as ``"fisher"``)."""
    problem.require_split("fisher")
    spec = recognised_loss(problem, "fisher")

    def output_operator(out: Any):
        problem.loss_of_output(out)  # the loss must accept what f accepts (raises as f raises)
        out_b, targets, unbatch = batched(spec, out, problem.targets)
        G = sample_output_gradients(spec, out_b, targets, mc_samples, generator)
        scale = 1.0 / (mc_samples * reduction_factor(spec, out_b, targets))
        return sample_factor(G, scale, unbatch, f"{mc_samples} sampled label gradient(s) per sample")

    return gauss_newton_operator(problem, output_operator, psd=True)
