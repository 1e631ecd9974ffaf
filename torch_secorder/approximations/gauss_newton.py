"""0.0.1's Gauss-Newton diagonal (legacy ``torch_secorder.approximations.gauss_newton``).

:func:`gauss_newton_matrix_approximation` returns ``diag(J^T J)`` for the
Jacobian ``J`` of the model's output with respect to the parameters that
require grad: the Gauss-Newton matrix of ``1/2 ||model(inputs) - targets||^2``
(summed), which is what torch-secorder 0.0.1 computed, one backward pass per
output entry. For the loss actually passed (``nn.MSELoss()`` averages over
the ``N x C`` output entries) the generalized Gauss-Newton is
``2 / (N C) * J^T J``; its diagonal is ``so.diagonal(f, curvature="ggn")``
(see the migration page).

Here ``diag(J^T J)`` is the GGN diagonal of ``nn.MSELoss(reduction="sum")``
(whose output Hessian is ``2 I``) halved, from secorder's curvature algebra:
``so.diagonal(f, curvature="ggn")``, which takes the structured engine
(curvature backpropagation, one backward pass) when the model qualifies. With
``create_graph=True`` the rows of ``J`` come from batched backward passes on the
autograd engine instead, so that the result is differentiable.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List

import torch
from torch import Tensor, nn

import secorder as so

from ..autograd_operator import attach_zero_grad, vector_jacobian_products
from ..core import _common
from ..errors import LegacyTypeError, LegacyValueError

__all__ = ["gauss_newton_matrix_approximation"]

# Jacobian rows per batched backward pass on the differentiable path: at most this many
# entries (rows x (outputs + parameters)) per chunk.
_CHUNK_ENTRIES = 2 ** 24

MSE_MESSAGE = (
    "Gauss-Newton Matrix approximation is typically used with MSE-based loss functions "
    "for least-squares problems. Please use `nn.MSELoss` or `F.mse_loss`."
)


def _is_mse(loss_fn: Any) -> bool:
    # 0.0.1's test, kept: an nn.MSELoss, or a callable whose repr names mse_loss / MSELoss.
    return isinstance(loss_fn, nn.MSELoss) or (
        callable(loss_fn) and ("mse_loss" in str(loss_fn) or "MSELoss" in str(loss_fn.__class__))
    )


@_common.owns_forward
def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    create_graph: bool = False,
) -> Iterable[Tensor]:
    r"""The diagonal of the Gauss-Newton matrix ``J^T J`` of the model's output, per parameter that requires grad.

    ``J`` is the Jacobian of ``model(inputs)`` (the residual
    ``model(inputs) - targets``) with respect to the parameters that require
    grad; ``diag(J^T J)_i = sum_o (d f_o / d theta_i)^2``. ``loss_fn`` must be
    MSE-based (``ValueError`` otherwise, as in 0.0.1) and is not evaluated.

    Args:
        model: the model.
        loss_fn: ``nn.MSELoss()`` or ``F.mse_loss``.
        inputs: the model's input.
        targets: the regression targets; they must broadcast to the output's
            shape without enlarging it (0.0.1 silently duplicated Jacobian rows).
        create_graph: if True the result is differentiable with respect to the
            parameters.

    Returns:
        A list with one tensor per parameter that requires grad, shaped like it
        (parameters the output does not depend on get zeros; 0.0.1 dropped
        them and misaligned the list).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> x, y = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 1)
        >>> w, b = gauss_newton_matrix_approximation(model, torch.nn.MSELoss(), x, y)
        >>> w, b                                    # sum over samples of x^2, and 1
        (tensor([[10.,  4.]]), tensor([2.]))
    """
    _common.check_model(model)
    if not _is_mse(loss_fn):
        raise ValueError(MSE_MESSAGE)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    with torch.no_grad():
        out = model(inputs)
    if not isinstance(out, Tensor):
        raise LegacyTypeError(f"model(inputs) must return a tensor, got {type(out).__name__}")
    if isinstance(targets, Tensor) and torch.broadcast_shapes(out.shape, targets.shape) != out.shape:
        raise LegacyValueError(
            f"targets of shape {tuple(targets.shape)} broadcast the output of shape {tuple(out.shape)} to a larger "
            "residual, which would count Jacobian rows several times; give targets the output's shape"
        )
    if create_graph:
        def forward() -> Tensor:
            with so.differentiable_ops():  # the result is differentiated again: kernels with every derivative
                return model(inputs)

        return _jtj_diagonal_autograd([p for _, p in named], forward)
    f = so.functional_loss(model, nn.MSELoss(reduction="sum"))
    params = {n: p.detach() for n, p in named}
    diag = so.diagonal(f, curvature="ggn")(params, inputs, torch.zeros_like(out))
    return [0.5 * diag[n] for n, _ in named]


def _jtj_diagonal_autograd(params: List[Tensor], forward: Callable[[], Tensor]) -> List[Tensor]:
    """``diag(J^T J)`` with a graph: the squares of the Jacobian's rows, a chunk of rows per batched backward pass.

    The differentiable path (``create_graph=True``): the transforms' results
    carry no graph back to the live parameters, the autograd engine's do.
    """
    out = forward()
    m, n = out.numel(), sum(p.numel() for p in params)
    chunk = max(1, _CHUNK_ENTRIES // max(1, m + n))
    eye = torch.eye(m, dtype=out.dtype, device=out.device)
    acc = [torch.zeros_like(p) for p in params]
    for start in range(0, m, chunk):
        rows = vector_jacobian_products(out, params, eye[start:start + chunk].reshape((-1,) + tuple(out.shape)),
                                        create_graph=True)
        acc = [a + (r * r).sum(0) for a, r in zip(acc, rows)]
    return [a if a.requires_grad else attach_zero_grad(a, params) for a in acc]
