"""Jacobian-vector and vector-Jacobian products of a closure's output (legacy ``torch_secorder.core.gvp``).

``func`` is a closure over the tensors in ``params`` returning an output of
any shape. It is called exactly once per call (0.0.1 called it once per
vector in the batch functions); the products are batched backward passes on
the autograd engine (:func:`torch_secorder.autograd_operator.jacobian_vector_products`
and :func:`~torch_secorder.autograd_operator.vector_jacobian_products`), so a
batch of ``k`` vectors, or the ``m`` rows of a full Jacobian, costs one
vmapped backward pass where 0.0.1 looped over vectors, outputs and parameters.

Every parameter must require grad (as in 0.0.1, PyTorch's ``RuntimeError``
otherwise); parameters the output does not depend on get zeros.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Union

import torch
from torch import Tensor, nn

from ..autograd_operator import attach_zero_grad, jacobian_vector_products, vector_jacobian_products
from ..errors import LegacyTypeError, LegacyValueError
from . import _common

__all__ = ["jvp", "vjp", "model_jvp", "model_vjp", "batch_jvp", "batch_vjp", "full_jacobian"]

Vectors = Union[Tensor, List[Tensor]]

# Rows of the identity per batched backward pass in ``full_jacobian``: at most this many
# entries (rows x (outputs + parameters)) per chunk.
_JACOBIAN_CHUNK_ENTRIES = 2 ** 24


def _graph_for(values: List[Tensor], params: List[Tensor], create_graph: bool) -> List[Tensor]:
    # With create_graph, a value that does not depend on the parameters still gets a
    # (zero-derivative) connection, so that autograd.grad over it works.
    if not create_graph:
        return values
    return [v if v.requires_grad else attach_zero_grad(v, params) for v in values]


def _setup(func: Any, params: Any) -> List[Tensor]:
    _common.check_callable(func)
    params = _common.check_params(params)
    _common.require_grad(params)
    return params


def _batched_vectors(vs: Any, params: List[Tensor]) -> List[Tensor]:
    """``vs`` as one ``(B, *p.shape)`` tensor per parameter, with one batch size ``B``."""
    if isinstance(vs, Tensor):
        vs = [vs]
    elif isinstance(vs, (list, tuple)):
        vs = list(vs)
    else:
        raise LegacyTypeError(f"vs must be a tensor or a list of tensors like params, got {type(vs).__name__}")
    if len(vs) != len(params):
        raise LegacyValueError(f"vs must have one tensor per parameter: got {len(vs)} for {len(params)} parameter(s)")
    for i, (u, p) in enumerate(zip(vs, params)):
        if not isinstance(u, Tensor):
            raise LegacyTypeError(f"vs[{i}] must be a tensor, got {type(u).__name__}")
        if u.dim() != p.dim() + 1 or u.shape[1:] != p.shape or u.shape[0] != vs[0].shape[0]:
            raise LegacyValueError(
                f"vs[{i}] has shape {tuple(u.shape)}, expected (batch, *{tuple(p.shape)}) like params[{i}] "
                f"with the batch size of vs[0] ({vs[0].shape[0] if vs[0].dim() else 'none'})"
            )
    return vs


def jvp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Vectors,
    create_graph: bool = False,
) -> Tensor:
    """The Jacobian-vector product ``J v`` of ``func()`` with respect to ``params``.

    Args:
        func: closure returning a tensor of any shape computed from ``params``;
            called exactly once.
        params: list of tensors that require grad.
        v: a tensor shaped like the single parameter, or a list of tensors
            shaped like ``params``.
        create_graph: if True the product is differentiable with respect to
            ``params``.

    Returns:
        A tensor shaped like ``func()``'s output (0.0.1 returned the same).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> jvp(lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], torch.tensor([0.5, -1.0]))
        tensor([  1., -12.])
    """
    params = _setup(func, params)
    vs, _ = _common.check_vectors(v, params)
    out = _common.call_output(func, params)
    res = jacobian_vector_products(out, params, [u.unsqueeze(0) for u in vs], create_graph=create_graph)[0]
    return _graph_for([res], params, create_graph)[0]


def vjp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Tensor,
    create_graph: bool = False,
) -> Vectors:
    """The vector-Jacobian product ``v^T J`` of ``func()`` with respect to ``params``.

    Args:
        func: closure returning a tensor of any shape; called exactly once.
        params: list of tensors that require grad.
        v: a tensor with as many entries as the output (reshaped to its shape).
        create_graph: if True the product is differentiable with respect to
            ``params``.

    Returns:
        A tensor shaped like the parameter when ``params`` has one entry,
        otherwise a list of tensors shaped like ``params`` (as in 0.0.1).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> vjp(lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], torch.tensor([0.5, -1.0]))
        tensor([  1., -12.])
    """
    params = _setup(func, params)
    if not isinstance(v, Tensor):
        raise LegacyTypeError(f"v must be a tensor shaped like func()'s output, got {type(v).__name__}")
    out = _common.call_output(func, params)
    if v.numel() != out.numel():
        raise LegacyValueError(
            f"v has shape {tuple(v.shape)} ({v.numel()} entries), but func() returned shape {tuple(out.shape)} "
            f"({out.numel()} entries)"
        )
    res = [r[0] for r in vector_jacobian_products(out, params, v.reshape((1,) + tuple(out.shape)), create_graph=create_graph)]
    res = _graph_for(res, params, create_graph)
    return res[0] if len(res) == 1 else res


@_common.owns_forward
def model_jvp(
    model: nn.Module,
    x: Any,
    v: Vectors,
    create_graph: bool = False,
) -> Tensor:
    """:func:`jvp` of ``model(x)`` with respect to ``list(model.parameters())``.

    The model's forward runs once, with grad enabled whatever the caller's
    grad mode; the model's state (buffers, train/eval flags, ``requires_grad``,
    ``.grad``) is left as it was.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> v = [torch.ones(1, 2), torch.ones(1)]
        >>> model_jvp(lin, torch.tensor([[1.0, 2.0]]), v)   # x . 1 + 1
        tensor([[4.]])
    """
    _common.check_model(model)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    return jvp(lambda: model(x), params, v, create_graph=create_graph)


@_common.owns_forward
def model_vjp(
    model: nn.Module,
    x: Any,
    v: Tensor,
    create_graph: bool = False,
) -> Vectors:
    """:func:`vjp` of ``model(x)`` with respect to ``list(model.parameters())``.

    Returns a list shaped like the parameters (a tensor if the model has a
    single parameter). The model's forward runs once; its state is left as it
    was.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> model_vjp(lin, torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]))
        [tensor([[3., 6.]]), tensor([3.])]
    """
    _common.check_model(model)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    return vjp(lambda: model(x), params, v, create_graph=create_graph)


def batch_jvp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    vs: Vectors,
    create_graph: bool = False,
) -> Tensor:
    """Jacobian-vector products ``J v_b`` for a batch of vectors, in one batched backward pass.

    Args:
        func: closure returning a tensor of any shape; called exactly once
            (0.0.1 called it once per vector).
        params: list of tensors that require grad.
        vs: a tensor of shape ``(B, *p.shape)`` for a single parameter ``p``,
            or a list of such tensors, one per parameter, with one batch size.
        create_graph: if True the products are differentiable with respect to
            ``params``.

    Returns:
        A tensor of shape ``(B, *output.shape)``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> batch_jvp(lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], torch.eye(2))
        tensor([[ 2.,  0.],
                [ 0., 12.]])
    """
    params = _setup(func, params)
    vs = _batched_vectors(vs, params)
    out = _common.call_output(func, params)
    res = jacobian_vector_products(out, params, vs, create_graph=create_graph)
    return _graph_for([res], params, create_graph)[0]


def batch_vjp(
    func: Callable[[], Tensor],
    params: List[Tensor],
    vs: Tensor,
    create_graph: bool = False,
) -> List[Tensor]:
    """Vector-Jacobian products ``v_b^T J`` for a batch of vectors, in one batched backward pass.

    Args:
        func: closure returning a tensor of any shape; called exactly once.
        params: list of tensors that require grad.
        vs: a tensor whose first dimension is the batch ``B``; each ``vs[b]``
            has as many entries as the output.
        create_graph: if True the products are differentiable with respect to
            ``params``.

    Returns:
        A list (always, as in 0.0.1) of tensors of shape ``(B, *p.shape)``,
        one per parameter.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> batch_vjp(lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], torch.eye(2))
        [tensor([[ 2.,  0.],
                [ 0., 12.]])]
    """
    params = _setup(func, params)
    if not isinstance(vs, Tensor):
        raise LegacyTypeError(f"vs must be a tensor of shape (batch, *output.shape), got {type(vs).__name__}")
    out = _common.call_output(func, params)
    if vs.dim() == 0 or math.prod(vs.shape[1:]) != out.numel():
        raise LegacyValueError(
            f"vs has shape {tuple(vs.shape)}; expected (batch, ...) with {out.numel()} entries per vector "
            f"like func()'s output of shape {tuple(out.shape)}"
        )
    res = vector_jacobian_products(out, params, vs.reshape((vs.shape[0],) + tuple(out.shape)), create_graph=create_graph)
    return _graph_for(res, params, create_graph)


def full_jacobian(
    func: Callable[[], Tensor],
    params: List[Tensor],
    create_graph: bool = False,
    *,
    chunk_size: Optional[int] = None,
) -> List[Tensor]:
    """The Jacobian of ``func()``'s flattened output with respect to each parameter.

    The rows are vector-Jacobian products with the rows of the identity,
    ``chunk_size`` rows per batched backward pass (default: as many as keep a
    chunk under 2^24 entries); 0.0.1 ran one backward pass per output entry
    and parameter.

    Args:
        func: closure returning a tensor of any shape (``m`` entries); called
            exactly once.
        params: list of tensors that require grad.
        create_graph: if True the Jacobians are differentiable with respect to
            ``params``.
        chunk_size: keyword-only, rows of the Jacobian per batched backward
            pass; bounds the memory (an addition to 0.0.1's signature).

    Returns:
        A list with one tensor of shape ``(m, p.numel())`` per parameter.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> full_jacobian(lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x])
        [tensor([[ 2.,  0.],
                [ 0., 12.]])]
    """
    params = _setup(func, params)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise LegacyValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    out = _common.call_output(func, params)
    m = out.numel()
    n = sum(p.numel() for p in params)
    if chunk_size is None:
        chunk_size = max(1, _JACOBIAN_CHUNK_ENTRIES // max(1, m + n))
    rows: List[List[Tensor]] = [[] for _ in params]
    eye = torch.eye(m, dtype=out.dtype, device=out.device)
    for start in range(0, m, chunk_size):
        U = eye[start:start + chunk_size].reshape((-1,) + tuple(out.shape))
        for i, r in enumerate(vector_jacobian_products(out, params, U, create_graph=create_graph)):
            rows[i].append(r.reshape(r.shape[0], -1))
    jac = [
        torch.cat(r) if r else p.new_zeros((0, p.numel()))
        for r, p in zip(rows, params)
    ]
    return _graph_for(jac, params, create_graph)
