"""Exact Hessian diagonal of a closure's loss (legacy ``torch_secorder.core.hessian_diagonal``).

The closure is called once; the diagonal comes from secorder's exact estimator
(:func:`secorder.estimators.exact.exact_diagonal`): one-hot columns of each
parameter's diagonal block, a chunk of columns per batched backward pass
through the gradient's graph (:mod:`torch_secorder.autograd_operator`). The cost is
about ``sum_i ceil(n_i / chunk)`` batched backward passes for parameters of
``n_i`` entries, instead of one backward pass per entry.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import Tensor, nn

from secorder.estimators.exact import exact_diagonal

from . import _common
from ._structured import structured_diagonal

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


def hessian_diagonal(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Optional[List[Tensor]] = None,
    create_graph: bool = False,
    strict: bool = False,
) -> List[Tensor]:
    """The exact diagonal of the Hessian of ``func()`` with respect to ``params``.

    Args:
        func: closure returning a scalar loss computed from ``params``. Called
            exactly once (never if no parameter requires grad and ``strict`` is
            False).
        params: list of tensors; the result has one tensor per entry, shaped,
            typed and placed like it, in the same order.
        v: optional list of tensors shaped like ``params`` (a bare tensor for a
            single parameter); the result is then ``v_i * H_ii`` entrywise.
        create_graph: if True the results are differentiable with respect to
            ``params`` (third derivatives); if False they carry no graph.
        strict: if True, a parameter that does not require grad, or that the
            loss does not use, raises PyTorch's ``RuntimeError``. If False they
            get zeros and the other parameters are still computed.

    Returns:
        A list of tensors, one per parameter.

    Raises:
        RuntimeError: under ``strict`` as above; ``LegacyValueError`` /
            ``LegacyTypeError`` (both ``RuntimeError`` subclasses, also
            ``ValueError`` / ``TypeError``) for a non-scalar loss, empty or
            non-tensor ``params``, or ``v`` of the wrong length or shapes.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> y = torch.tensor([3.], requires_grad=True)
        >>> hessian_diagonal(lambda: (x ** 3).sum() * y.sum(), [x, y])
        [tensor([18., 36.]), tensor([0.])]
        >>> hessian_diagonal(lambda: (x ** 3).sum(), [x], v=[torch.tensor([1., -1.])])
        [tensor([  6., -12.])]
    """
    _common.check_callable(func)
    params = _common.check_params(params)
    vs = None if v is None else _common.check_vectors(v, params)[0]
    active = _common.check_strict(params, strict)
    diag: List[Tensor] = []
    if active:
        op = _common.closure_operator(func, params, active, create_graph, strict)
        diag = exact_diagonal(op)
    result = _common.scatter(params, active, diag, create_graph)
    if vs is not None:
        result = [d * u for d, u in zip(result, vs)]
    return result


@_common.owns_forward
def model_hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    create_graph: bool = False,
    strict: bool = False,
) -> List[Tensor]:
    """The exact Hessian diagonal of ``loss_fn(model(inputs), targets)`` over ``list(model.parameters())``.

    Same semantics as :func:`hessian_diagonal`. When the model and loss qualify
    for secorder's structured engine (plain feed-forward stacks with standard
    losses, see ``secorder.structured``) and ``create_graph`` is False, the
    diagonal comes from it: one forward pass and one structured backward pass,
    no per-column Hessian-vector products. Otherwise the model's forward runs
    once and the generic closure path computes the diagonal.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> x, y = torch.tensor([[1., 2.]]), torch.tensor([[0.]])
        >>> w_diag, b_diag = model_hessian_diagonal(lin, torch.nn.functional.mse_loss, x, y)
        >>> w_diag, b_diag                        # 2 x^2 and 2
        (tensor([[2., 8.]]), tensor([2.]))
    """
    closure = _common.model_closure(model, loss_fn, inputs, targets)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    active = _common.check_strict(params, strict)
    if active and not create_graph:
        diag = structured_diagonal(model, loss_fn, inputs, targets, [params[i] for i in active])
        if diag is not None:
            return _common.scatter(params, active, diag, create_graph=False)
    return hessian_diagonal(closure, params, create_graph=create_graph, strict=strict)
