"""Linear layers, matrix products, ``einsum`` and convolutions.

All are linear in each operand, so one :func:`~.common.multilinear` rule serves
them: with one traced operand (``h @ W`` with constant weights, the hot case)
the value, the Jacobian and the Laplacian go through the same product, the
Jacobian's directions folded into the leading (batch) dimensions of one matmul;
with two traced operands the product rule adds the cross term. A bias is an
additive constant: it enters the value only. The ``batched`` helpers give the
direct form of a product with directions in the leading dimension where
broadcasting allows it, and ``None`` (meaning ``vmap``) elsewhere.
"""

from __future__ import annotations

import string

import torch
import torch.nn.functional as F

from ..jet import lazy, make_jet
from ..registry import register
from .common import is_jet, multilinear, primal, traced, uncovered


def _matmul_batched(operands, positions):
    a, b = operands
    if positions == (0,):  # directions lead a: (k, *a.shape) @ b, b's batch dimensions align on the right
        if b.dim() <= 2 or a.dim() - 1 >= b.dim():
            return torch.matmul(a, b)
    elif positions == (1,):  # directions lead b
        b_dim = b.dim() - 1
        if b_dim >= 2 and a.dim() <= b_dim:
            return torch.matmul(a, b)
        if b_dim == 1 and a.dim() <= 2:  # a @ v for every direction v: V @ a^T
            return torch.matmul(b, a.mT if a.dim() == 2 else a)
    elif a.dim() == b.dim() >= 3:  # directions lead both: they pair up as a batch dimension
        return torch.matmul(a, b)
    return None


@register(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
          torch.bmm, torch.Tensor.bmm)
def _matmul(func, args, kwargs):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    return multilinear(func, [a, b], _matmul_batched)


@register(torch.Tensor.__rmatmul__)
def _rmatmul(func, args, kwargs):
    x, other = args[0], args[1]  # other @ x
    return multilinear(torch.matmul, [other, x], _matmul_batched)


@register(torch.mv, torch.Tensor.mv, torch.dot, torch.Tensor.dot, torch.inner, torch.Tensor.inner,
          torch.outer, torch.Tensor.outer, torch.ger, torch.Tensor.ger, torch.kron, torch.Tensor.kron,
          torch.tensordot, torch.cross, torch.linalg.cross, torch.linalg.vecdot)
def _other_products(func, args, kwargs):
    # Bilinear in the two tensor arguments; the rest (dims, ...) are options.
    a, b, rest = args[0], args[1], args[2:]
    return multilinear(lambda x, y: func(x, y, *rest, **kwargs), [a, b])


def _linear_batched(operands, positions):
    x, w = operands
    if positions == (0,):
        return F.linear(x, w)
    if positions == (1,) and x.dim() <= 2:
        return torch.matmul(x, w.mT)
    return None


@register(F.linear)
def _linear(func, args, kwargs):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if is_jet(bias):
        return traced(multilinear(F.linear, [x, w], _linear_batched)) + traced(bias)
    value = F.linear(primal(x), primal(w), bias)
    if is_jet(x) and not is_jet(w):  # h @ W^T + b with constant weights: the hot path
        return make_jet(value, lazy(lambda: F.linear(x.jac, w), w), F.linear(x.lap, w), x.trace)
    return multilinear(F.linear, [x, w], _linear_batched, value=value)


def _einsum_batched(equation, count):
    if "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != count:
        return None
    free = [c for c in string.ascii_letters if c not in equation]
    if not free:
        return None
    z = free[0]

    def batched(operands, positions):
        new_terms = [z + t if i in positions else t for i, t in enumerate(terms)]
        return torch.einsum(",".join(new_terms) + "->" + z + output, *operands)

    return batched


@register(torch.einsum, torch.functional.einsum)
def _einsum(func, args, kwargs):
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return multilinear(lambda *ops: torch.einsum(equation, *ops), list(operands),
                       _einsum_batched(equation, len(operands)))


def _conv(func, args, kwargs):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    rest = args[3:]
    options = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    if is_jet(bias):
        raise uncovered(func, "a traced bias")
    value = func(primal(x), primal(w), bias, *rest, **options)
    return multilinear(lambda a, b: func(a, b, None, *rest, **options), [x, w], value=value)


register(F.conv1d, F.conv2d, F.conv3d)(_conv)
