"""The generalised Gauss-Newton matrix ``J^T H_L J`` (Schraudolph 2002).

``H_L`` is the Hessian of the loss with respect to the model output, taken by
autograd (``vjp`` of ``grad``), so any ``loss_fn`` works; the GGN is positive
semi-definite when the loss is convex in the output, which holds for the
recognised losses (cross-entropy, MSE, BCE with logits) and is not assumed for
others.

Reference:
    Schraudolph, N. N. (2002). Fast curvature matrix-vector products for second-order
    gradient descent. Neural Computation 14(7).
"""

from __future__ import annotations

from typing import Any

from torch.func import grad, vjp

from ..losses import UnsupportedLoss, loss_spec
from .base import LeafOperator
from .gauss_newton import gauss_newton_operator
from .output_factor import ggn_factor

__all__ = ["build"]


def _convex(loss_fn: Any) -> bool:
    try:
        loss_spec(loss_fn)
    except UnsupportedLoss:
        return False
    return True


def build(problem: Any, *, mc_samples: int = 1, generator: Any = None) -> LeafOperator:
    """The GGN of the call's ``f = loss_fn(model(inputs; params), targets)`` (registered as ``"ggn"``)."""
    problem.require_split("ggn")

    def output_operator(out: Any):
        _, loss_hvp = vjp(grad(problem.loss_of_output), out)
        return lambda u: loss_hvp(u)[0]

    return gauss_newton_operator(problem, output_operator, psd=_convex(problem.loss_fn),
                                 factor=lambda out: ggn_factor(problem, out))
