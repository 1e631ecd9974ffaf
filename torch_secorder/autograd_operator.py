"""Curvature products on PyTorch's autograd engine, for losses already computed.

Legacy-only helper of the ``torch_secorder`` shim (only the shim uses it, so it
lives here and not in ``secorder``). The functional transforms build their
matvecs with ``torch.func``, which needs the loss as a pure function of its
inputs. Imperative code (a closure that
reads leaf tensors, the legacy ``torch_secorder`` API) only hands over a loss
tensor with its autograd graph. This module turns such a loss into the same
:class:`secorder.operators.LeafOperator` that the estimators see:

* one ``torch.autograd.grad(loss, leaves, create_graph=True)`` when the operator
  is built (the only forward and backward pass through the model), then
* every matvec is one backward pass through that gradient's graph, batched over
  the probes with ``is_grads_batched=True`` (a ``vmap`` over the backward pass),
  so ``k`` probes cost one batched call rather than ``k`` Python-level calls.

The Hessian is symmetric, so the vector-Jacobian product of the gradient is the
Hessian-vector product (Pearlmutter 1994, "Fast exact multiplication by the
Hessian"). Two helpers for the other legacy products live here as well:
:func:`finite_difference_hvp` and :func:`gauss_newton_product`.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from secorder.composites import differentiable_ops
from secorder.operators import LeafOperator

from ._fused import explain_fused_attention
from .errors import LegacyTypeError

__all__ = [
    "autograd_hessian_operator",
    "finite_difference_hvp",
    "gauss_newton_product",
    "attach_zero_grad",
    "jacobian_vector_products",
    "vector_jacobian_products",
]


def _batched_grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    create_graph: bool,
) -> List[Tensor]:
    """``sum_j (d outputs_j / d inputs)^T grad_outputs_j`` for a leading probe batch, zeros for unreached inputs."""
    k = grad_outputs[0].shape[0]
    # create_graph must record whatever the caller's grad mode; a graph built before the call through a
    # fused attention kernel cannot be differentiated again: PyTorch's error then says what to do.
    with torch.enable_grad(), explain_fused_attention():
        res = _grad_or_batched(outputs, inputs, grad_outputs, create_graph, k)
    return [
        r if r is not None else x.new_zeros((k,) + tuple(x.shape))
        for r, x in zip(res, inputs)
    ]


def _grad_or_batched(outputs, inputs, grad_outputs, create_graph: bool, k: int) -> List[Optional[Tensor]]:
    if k == 1:
        # A single probe: the plain backward pass, without vmap's overhead.
        res = torch.autograd.grad(
            list(outputs), list(inputs), grad_outputs=[g[0] for g in grad_outputs],
            retain_graph=True, create_graph=create_graph, allow_unused=True,
        )
        res = [None if r is None else r.unsqueeze(0) for r in res]
    else:
        res = torch.autograd.grad(
            list(outputs), list(inputs), grad_outputs=list(grad_outputs),
            retain_graph=True, create_graph=create_graph, allow_unused=True, is_grads_batched=True,
        )
    return list(res)


def jacobian_vector_products(
    output: Tensor, leaves: Sequence[Tensor], V: Sequence[Tensor], *, create_graph: bool = False
) -> Tensor:
    """``J V``: the Jacobian of ``output`` (already computed from ``leaves``) times a batch of tangents.

    ``V`` has one tensor per leaf, each with a leading probe dimension ``k``;
    the result has shape ``(k, *output.shape)``. On the autograd engine a JVP
    is the VJP of the linear map ``u -> J^T u`` (the double-backward trick,
    which needs no forward-mode rules): one backward pass with a graph builds
    ``J^T u`` for a dummy cotangent ``u``, then one batched backward pass
    through it gives all ``k`` products. Leaves the output does not depend on
    contribute zero. With ``create_graph=True`` the products are
    differentiable with respect to the leaves.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> jacobian_vector_products(torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], [torch.eye(2)])
        tensor([[ 2.,  0.],
                [ 0., 12.]])
    """
    leaves = list(leaves)
    k = V[0].shape[0]
    with torch.enable_grad():
        dummy = torch.zeros_like(output, requires_grad=True)
        jt_u = torch.autograd.grad(output, leaves, grad_outputs=dummy, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        if not used or k == 0:
            return output.new_zeros((k,) + tuple(output.shape))
        return _batched_grad(
            [jt_u[i] for i in used], [dummy], [V[i].to(jt_u[i].dtype) for i in used], create_graph
        )[0]


def vector_jacobian_products(
    output: Tensor, leaves: Sequence[Tensor], U: Tensor, *, create_graph: bool = False
) -> List[Tensor]:
    """``U J``: a batch of cotangents ``U`` of shape ``(k, *output.shape)`` times the Jacobian of ``output``.

    One backward pass, batched over the ``k`` cotangents; one tensor of shape
    ``(k, *leaf.shape)`` per leaf, zeros for leaves the output does not reach.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> vector_jacobian_products(torch.stack([x[0] ** 2, 3 * x[1] ** 2]), [x], torch.eye(2))
        [tensor([[ 2.,  0.],
                [ 0., 12.]])]
    """
    leaves = list(leaves)
    if U.shape[0] == 0:
        return [x.new_zeros((0,) + tuple(x.shape)) for x in leaves]
    return _batched_grad([output], leaves, [U.to(output.dtype)], create_graph)


def autograd_hessian_operator(
    loss: Tensor,
    leaves: Sequence[Tensor],
    *,
    create_graph: bool = False,
    allow_unused: bool = True,
) -> LeafOperator:
    """The Hessian of ``loss`` with respect to ``leaves``, as batched autograd-engine matvecs.

    ``loss`` is a scalar tensor already computed from ``leaves`` (tensors that
    require grad). Building the operator runs one backward pass with
    ``create_graph=True``; the operator keeps that graph alive (drop it to free
    the memory). Each ``matvec`` / ``block_matvec`` call is one backward pass
    through the gradient, batched over the leading probe dimension.

    Leaves that ``loss`` does not use, and leaves on which the gradient does not
    depend (a linear term), get zero blocks. With ``allow_unused=False`` an
    unused leaf (or a ``loss`` with no graph at all) raises PyTorch's own
    ``RuntimeError`` instead. With ``create_graph=True`` the products are
    differentiable with respect to the leaves (third derivatives).

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> op = autograd_hessian_operator((x ** 3).sum(), [x])
        >>> op.block_matvec(0, torch.eye(2))     # Hessian diag(6 x)
        tensor([[ 6.,  0.],
                [ 0., 12.]])
        >>> op.matvec([torch.ones(1, 2)])[0]
        tensor([[ 6., 12.]])
    """
    leaves = list(leaves)
    if loss.requires_grad or not allow_unused:
        with torch.enable_grad():  # the gradient's graph is ours to build, whatever the caller's grad mode
            grads = list(torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=allow_unused))
    else:
        grads = [None] * len(leaves)
    # Gradients that carry a graph: the others have a zero Hessian row block.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def matvec(V: List[Tensor]) -> List[Tensor]:
        V = list(V)
        if not live:
            return [torch.zeros_like(v) for v in V]
        return _batched_grad([grads[i] for i in live], leaves, [V[i] for i in live], create_graph)

    def block_matvec(index: int, V: Tensor) -> Tensor:
        if index not in live:
            return torch.zeros_like(V)
        return _batched_grad([grads[index]], [leaves[index]], [V], create_graph)[0]

    return LeafOperator(templates=[x.detach() for x in leaves], matvec=matvec, block_matvec=block_matvec)


def attach_zero_grad(value: Tensor, leaves: Sequence[Tensor]) -> Tensor:
    """``value`` unchanged, but connected to ``leaves`` in the autograd graph with a zero derivative.

    A curvature value that happens not to depend on some leaf (a constant
    Hessian block, an unused parameter) carries no graph to it, and
    ``torch.autograd.grad(value, leaves)`` would then fail. The connection is a
    ``torch.where`` that selects none of the leaf's entries, so the value is
    exact (no ``0 * leaf``, which is NaN at an infinite entry) and the
    derivative is zero. Leaves that do not require grad are skipped.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], requires_grad=True)
        >>> t = attach_zero_grad(torch.tensor(2.), [x])
        >>> t, torch.autograd.grad(t, x)[0]
        (tensor(2., grad_fn=<AddBackward0>), tensor([0., 0.]))
    """
    for leaf in leaves:
        if not leaf.requires_grad:
            continue
        none = torch.zeros((), dtype=torch.bool, device=leaf.device)
        value = value + torch.where(none, leaf, torch.zeros((), dtype=leaf.dtype, device=leaf.device)).sum().to(value.dtype)
    return value


# Formats whose machine epsilon is at least this (float16, bfloat16, float8) get a warning:
# a finite difference there cannot reach the accuracy that callers of an "HVP" expect.
LOW_PRECISION_EPS = 2.0 ** -10


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for the difference arithmetic: ``dtype``, promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _rms(tensors: Sequence[Tensor], work: torch.dtype) -> Tensor:
    """The root mean square of all entries of ``tensors`` (0-dim, ``work`` dtype, no host sync)."""
    total = sum((t.detach().to(work).pow(2).sum() for t in tensors), torch.zeros((), dtype=work))
    count = max(sum(t.numel() for t in tensors), 1)
    return (total / count).sqrt()


#: The step is this fraction of the balance point ``eps_mach^(1/3) * scale`` (see :func:`_relative_step`).
STEP_FRACTION = 0.25


def _relative_step(leaves: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """Central-difference step ``eps_mach^(1/3) / 4 * max(1, rms(p)) / rms(v)`` (0-dim, working dtype, no host sync).

    The step balances the truncation error of a central difference, of order
    ``step^2`` times the third derivative, against the rounding error of the
    gradients, of order ``eps_mach / step`` (Nocedal and Wright, "Numerical
    Optimization", 2nd ed., section 8.1): its scale is ``eps_mach^(1/3)`` of the
    format, times the root-mean-square size of the parameters over that of the
    direction (a shift of the size of the parameters' rounding, whatever a single
    large entry). The balance point assumes third derivatives of the size of the
    second at the parameters' scale; networks of saturating units (``tanh``) vary
    faster, so the step is :data:`STEP_FRACTION` of it. In float64 and float32
    the difference is then accurate to about ``1e-9`` and ``1e-4``; in float16
    and bfloat16, where the balance itself is poor, measured on ``tanh`` layers,
    a cross-entropy MLP and a quartic (10 seeds each), the median relative error
    went from 3-55% (bfloat16) and 1-17% (float16) with ``eps^(1/3) max(1, |p|max)
    / |v|max`` to 3-7% and 1-2%.
    """
    dtype = leaves[0].dtype
    work = working_dtype(dtype)
    device = leaves[0].device
    p_scale = _rms(leaves, work).to(device).clamp_min(1.0)
    v_scale = _rms(v, work).to(device).clamp_min(torch.finfo(work).tiny)
    return STEP_FRACTION * torch.finfo(dtype).eps ** (1.0 / 3.0) * p_scale / v_scale


def finite_difference_hvp(
    func: Callable[[], Tensor],
    leaves: Sequence[Tensor],
    v: Sequence[Tensor],
    *,
    eps: Optional[float] = None,
) -> List[Tensor]:
    """Central-difference Hessian-vector product ``(g(p + eps v) - g(p - eps v)) / (2 eps)``.

    ``func`` is a closure that reads the leaf tensors ``leaves`` (which require
    grad) and returns a scalar loss; ``g`` is its gradient. ``func`` is called
    exactly twice, with every leaf shifted in place by ``+eps * v`` and then
    ``-eps * v``. The leaves are restored bit for bit afterwards (copied back
    from a saved copy, not shifted back, which would round), also when
    ``func`` raises. ``eps=None`` takes ``eps_mach^(1/3) / 4 * max(1, rms(p)) /
    rms(v)`` for the leaves' format (truncation error ``O(eps^2)``, rounding
    error ``O(eps_mach / eps)``; see :func:`_relative_step`); the difference
    quotient is formed in at least float32 and returned in the leaves' dtype.
    In float16 and bfloat16 even that leaves a relative error of a few percent
    and, on large models, often far more: a ``RuntimeWarning`` says so. The
    result carries no graph. Unused leaves get zeros.

    Example:
        >>> import torch
        >>> x = torch.tensor([1., 2.], dtype=torch.float64, requires_grad=True)
        >>> hv = finite_difference_hvp(lambda: (x ** 3).sum(), [x], [torch.ones(2, dtype=torch.float64)])
        >>> torch.allclose(hv[0], torch.tensor([6., 12.], dtype=torch.float64))   # exact for a cubic
        True
    """
    leaves, v = list(leaves), list(v)
    dtype = leaves[0].dtype
    if dtype.is_floating_point and torch.finfo(dtype).eps >= LOW_PRECISION_EPS:
        warnings.warn(
            f"approximate_hvp in {dtype}: a finite-difference Hessian-vector product in a format with "
            f"machine epsilon {torch.finfo(dtype).eps:g} has a relative error of at least about "
            f"{torch.finfo(dtype).eps ** (2 / 3):.0%} and, on large models, often far more (the gradient's own "
            "rounding error is divided by the step); exact_hvp computes it exactly at the same cost",
            RuntimeWarning,
            stacklevel=3,
        )
    work = working_dtype(dtype)
    step = _relative_step(leaves, v) if eps is None else torch.as_tensor(eps, dtype=work)

    def gradient() -> List[Tensor]:
        grads = torch.autograd.grad(func(), leaves, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]

    saved = [x.detach().clone() for x in leaves]
    shifts = [u.to(device=x.device, dtype=work) * step.to(x.device) for x, u in zip(leaves, v)]
    try:
        with torch.no_grad():
            for x, s, d in zip(leaves, saved, shifts):
                x.copy_(s.to(work) + d)
        g_plus = gradient()
        with torch.no_grad():
            for x, s, d in zip(leaves, saved, shifts):
                x.copy_(s.to(work) - d)
        g_minus = gradient()
    finally:
        with torch.no_grad():
            for x, s in zip(leaves, saved):
                x.copy_(s)
    return [
        ((a.to(work) - b.to(work)) / (2 * step.to(a.device))).to(a.dtype)
        for a, b in zip(g_plus, g_minus)
    ]


def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    v: Sequence[Tensor],
    *,
    create_graph: bool = False,
) -> List[Tensor]:
    """Generalized Gauss-Newton product ``J^T H_out J v`` over ``list(model.parameters())``.

    ``J`` is the Jacobian of ``model(inputs)`` with respect to the parameters
    and ``H_out`` the Hessian of ``loss_fn(output, targets)`` with respect to
    the output (Schraudolph 2002, "Fast curvature matrix-vector products for
    second-order gradient descent"). The model's forward runs once, on the
    autograd engine (so training-mode BatchNorm, hooks and in-place buffer
    updates behave as in a plain call). Then ``J v`` is one JVP, computed as the
    VJP of the linear map ``u -> J^T u`` (the double-backward trick, which needs
    no forward-mode rules); one double backward through the loss gives
    ``H_out J v``; one VJP through the model's graph gives the result. No loop
    over outputs. With ``create_graph=True`` the result is differentiable with
    respect to the parameters. Parameters the output does not use get zeros;
    parameters that do not require grad raise PyTorch's ``RuntimeError``.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1., 2.]]))
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> # mse (mean over 2 outputs): H_out = I, J = x, so J^T J v = v
        >>> gauss_newton_product(lin, torch.nn.functional.mse_loss, x, y, [torch.tensor([[1., 0.]])])
        [tensor([[1., 0.]])]
    """
    params = list(model.parameters())
    v = [u.to(p.dtype) for u, p in zip(v, params)]
    with torch.enable_grad():
        with differentiable_ops():  # J v differentiates the model twice (fused attention cannot)
            out = model(inputs)
        if not isinstance(out, Tensor):
            raise LegacyTypeError(f"model(inputs) must return a tensor, got {type(out).__name__} (wrap the model in a "
                            "module that returns its output tensor, such as the logits of a ModelOutput)")
        jv = jacobian_vector_products(out, params, [u.unsqueeze(0) for u in v], create_graph=create_graph)[0]
        # H_out J v: the VJP of the loss's output gradient with cotangent J v (H_out
        # is symmetric). With create_graph=True it stays a function of the
        # parameters, through the output and through J v.
        loss = loss_fn(out, targets)
        (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        h_jv = None
        if g_out.requires_grad:
            (h_jv,) = torch.autograd.grad(
                g_out, out, grad_outputs=jv, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
        if h_jv is None:
            h_jv = torch.zeros_like(out)
        res = torch.autograd.grad(out, params, grad_outputs=h_jv, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if r is None else r for r, p in zip(res, params)]
