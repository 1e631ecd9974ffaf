"""Hessian-vector products and a Hutchinson trace (legacy ``torch_secorder.core.hvp``).

Every product is built by :mod:`torch_secorder.autograd_operator` on PyTorch's
autograd engine; the stochastic trace is secorder's Hutchinson estimator
(:func:`secorder.estimators.hutchinson_trace`). Results follow the legacy
convention: a bare tensor ``v`` (with a single parameter) gives a tensor, a
list ``v`` gives a list shaped like ``params``.
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Union

from torch import Tensor, nn

from .. import autograd_operator

from . import _common
from ..errors import LegacyTypeError

__all__ = ["exact_hvp", "model_hvp", "approximate_hvp", "gauss_newton_product", "hessian_trace"]

Vectors = Union[Tensor, List[Tensor]]


def _pack(values: List[Tensor], single: bool) -> Vectors:
    return values[0] if single else list(values)


def exact_hvp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Vectors,
    create_graph: bool = False,
) -> Vectors:
    """The exact Hessian-vector product ``H v`` of ``func()`` with respect to ``params``.

    ``func`` is called exactly once; then one backward pass with a graph and
    one backward pass through it (double backpropagation, Pearlmutter 1994).
    ``v`` is a tensor (single parameter) or a list of tensors shaped like
    ``params``. Parameters the loss does not use get zeros; a parameter that
    does not require grad raises PyTorch's ``RuntimeError``. With
    ``create_graph=True`` the product is differentiable with respect to
    ``params``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> exact_hvp(lambda: (x ** 3).sum(), [x], torch.tensor([1., 1.]))
        tensor([ 6., 12.])
        >>> exact_hvp(lambda: (x ** 3).sum(), [x], [torch.tensor([1., 0.])])
        [tensor([6., 0.])]
    """
    _common.check_callable(func)
    params = _common.check_params(params)
    vs, single = _common.check_vectors(v, params)
    _common.require_grad(params)
    op = autograd_operator.autograd_hessian_operator(
        _common.call_loss(func, params=params), params, create_graph=create_graph
    )
    hv = op.matvec([u.to(p.dtype).unsqueeze(0) for u, p in zip(vs, params)])
    hv = _common.scatter(params, range(len(params)), [h[0] for h in hv], create_graph)
    return _pack(hv, single)


@_common.owns_forward
def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Vectors,
    create_graph: bool = False,
) -> Vectors:
    """:func:`exact_hvp` of ``loss_fn(model(x), y)`` over ``list(model.parameters())``.

    The model's forward runs once.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1., 2.]]), torch.tensor([[0.]])
        >>> model_hvp(lin, torch.nn.functional.mse_loss, x, y, torch.tensor([[1., 0.]]))  # 2 x x^T v
        tensor([[2., 4.]])
    """
    closure = _common.model_closure(model, loss_fn, x, y)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    return exact_hvp(closure, params, v, create_graph=create_graph)


def approximate_hvp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Vectors,
    num_samples: int = 1,
    damping: float = 0.0,
) -> Vectors:
    """Finite-difference Hessian-vector product ``(g(p + eps v) - g(p - eps v)) / (2 eps) + damping * v``.

    ``g`` is the gradient of ``func()``; a central difference (error
    ``O(eps^2)``, where 0.0.1's forward difference had ``O(eps)``) with the
    step ``eps`` chosen for the parameters' format, see
    :func:`torch_secorder.autograd_operator.finite_difference_hvp`. ``func`` is
    called exactly twice. The difference is deterministic, so ``num_samples``
    repeated evaluations would all agree: it is checked (a positive int) and
    otherwise ignored. ``params`` are shifted in place for the two calls and
    restored bit for bit afterwards, also when ``func`` raises. The result
    carries no graph. In float16 / bfloat16 a finite difference cannot be
    accurate (a few percent at best, often far worse on large models): a
    ``RuntimeWarning`` says so; use :func:`exact_hvp`, exact at the same cost.
    Finite differences also see the kinks of piecewise-linear activations
    (ReLU) that the step crosses, which the Hessian does not contain.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], dtype=torch.float64, requires_grad=True)
        >>> hv = approximate_hvp(lambda: (x ** 2).sum(), [x], torch.ones(2, dtype=torch.float64), damping=0.5)
        >>> torch.allclose(hv, torch.tensor([2.5, 2.5], dtype=torch.float64))
        True
    """
    _common.check_callable(func)
    params = _common.check_params(params)
    vs, single = _common.check_vectors(v, params)
    _common.check_num_samples(num_samples)
    if isinstance(damping, bool) or not isinstance(damping, (numbers.Real, Tensor)):
        raise LegacyTypeError(f"damping must be a real number, got {type(damping).__name__}")
    _common.require_grad(params)
    hv = autograd_operator.finite_difference_hvp(lambda: _common.call_loss(func, params=params), params, vs)
    if not (isinstance(damping, numbers.Real) and damping == 0):
        hv = [h + damping * u.to(h.dtype) for h, u in zip(hv, vs)]
    return _pack(hv, single)


@_common.owns_forward
def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Vectors,
    create_graph: bool = False,
) -> Vectors:
    """The Gauss-Newton product ``J^T H_out J v`` for ``loss_fn(model(x), y)``.

    ``J`` is the Jacobian of ``model(x)`` with respect to
    ``list(model.parameters())`` and ``H_out`` the Hessian of the loss with
    respect to the model output. One JVP (double-backward trick), one double backward
    through the loss, one VJP: no loop over outputs; the model's forward runs
    once (see :func:`torch_secorder.autograd_operator.gauss_newton_product`). With
    ``create_graph=True`` the product is differentiable with respect to the
    parameters.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1., 2.]]), torch.tensor([[0.]])
        >>> gauss_newton_product(lin, torch.nn.functional.mse_loss, x, y, torch.tensor([[1., 0.]]))
        tensor([[2., 4.]])
    """
    _common.check_model(model)
    _common.check_callable(loss_fn, "loss_fn")
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    vs, single = _common.check_vectors(v, params)
    _common.require_grad(params)

    def checked_loss(out: Tensor, target: Tensor) -> Tensor:
        return _common.call_loss(lambda: loss_fn(out, target), "loss_fn", params=(out,))

    res = autograd_operator.gauss_newton_product(model, checked_loss, x, y, vs, create_graph=create_graph)
    return _pack(_common.scatter(params, range(len(params)), res, create_graph), single)


def hessian_trace(
    func: Callable[[], Tensor],
    params: List[Tensor],
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
) -> float:
    """Hutchinson's estimate of the Hessian trace of ``func()``, as a Python float.

    ``num_samples`` Rademacher probes ``z`` (entries +-1), ``mean(z^T H z)``
    (Hutchinson 1989). With ``sparse=True`` each probe entry is non-zero with
    probability 0.1 and then +-1/sqrt(0.1), so ``E[z z^T] = I`` and the
    estimate stays unbiased. ``func`` is called exactly once; the probes go
    through batched backward passes. Probes come from PyTorch's global RNG
    (seed it with ``torch.manual_seed``). The result is a float, as the legacy
    API documents, so it carries no graph whatever ``create_graph`` says (the
    flag is accepted for compatibility). Parameters the loss does not use
    contribute zero; one that does not require grad raises PyTorch's
    ``RuntimeError``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> hessian_trace(lambda: (x ** 2).sum(), [x], num_samples=5)   # z^T (2 I) z = 2 n exactly
        4.0
    """
    from secorder.estimators import hutchinson_trace

    _common.check_callable(func)
    params = _common.check_params(params)
    num_samples = _common.check_num_samples(num_samples)
    _common.require_grad(params)
    op = autograd_operator.autograd_hessian_operator(_common.call_loss(func, params=params), params)
    estimate = hutchinson_trace(
        op, num_samples, distribution="sparse" if sparse else "rademacher", density=0.1
    )
    return float(estimate.value)
