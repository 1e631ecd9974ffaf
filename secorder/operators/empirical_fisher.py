"""The empirical Fisher: ``(1/c) sum_n J_n^T g_n g_n^T J_n``, the uncentred gradient covariance.

``g_n`` is the gradient of the per-sample loss ``l_n`` with respect to the model
output (:func:`secorder.losses.per_sample_output_gradients`), so that
``J_n^T g_n`` is the per-sample parameter gradient and the matrix is
``(1/c) sum_n grad l_n grad l_n^T`` with ``c`` the reduction factor (what
Adam-style and "squared gradient" users compute). Needs a recognised loss;
scale conventions are those of curvlinops' ``EFLinearOperator``.

Reference:
    Kunstner, F., Hennig, P., Balles, L. (2019). Limitations of the empirical Fisher
    approximation for natural gradient descent. NeurIPS.
"""

from __future__ import annotations

from typing import Any

from ..losses import per_sample_output_gradients, reduction_factor
from ._samples import batched, recognised_loss, sample_factor
from .base import LeafOperator
from .gauss_newton import gauss_newton_operator

__all__ = ["build"]


def build(problem: Any, *, mc_samples: int = 1, generator: Any = None) -> LeafOperator:
    """The empirical Fisher of the call's ``f`` (registered as ``"empirical_fisher"``)."""
    problem.require_split("empirical_fisher")
    spec = recognised_loss(problem, "empirical_fisher")

    def output_operator(out: Any):
        problem.loss_of_output(out)  # the loss must accept what f accepts (raises as f raises)
        out_b, targets, unbatch = batched(spec, out, problem.targets)
        G = per_sample_output_gradients(spec, out_b, targets)[None]
        return sample_factor(G, 1.0 / reduction_factor(spec, out_b, targets), unbatch, "the per-sample gradient")

    return gauss_newton_operator(problem, output_operator, psd=True)
