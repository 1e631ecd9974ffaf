"""Operations whose results carry no derivative: evaluated on the values.

Shapes, dtypes and other metadata; comparisons and tests (their results are
booleans, so control flow on values works as in eager PyTorch); index-valued
and piecewise-constant functions (``argmax``, ``sign``, ``floor``, whose
derivatives are zero wherever they exist, as ``torch.func.hessian`` has them);
``detach`` (a constant by definition); and factories that only borrow a shape,
dtype and device (``zeros_like``, ``new_ones``, ...).
"""

from __future__ import annotations

import torch

from ..registry import register
from .common import constant, is_jet, primal, uncovered

_TENSOR_METHODS = (
    "dim", "ndimension", "size", "numel", "nelement", "element_size", "stride", "storage_offset",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "__len__", "__bool__", "__float__",
    "__int__", "__index__", "item", "tolist", "get_device", "__format__",
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal", "not_equal",
    "__gt__", "__ge__", "__lt__", "__le__", "__eq__", "__ne__",
    "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isreal", "logical_not", "logical_and", "logical_or",
    "logical_xor", "any", "all", "count_nonzero", "nonzero", "argmax", "argmin", "argsort", "argwhere",
    "sign", "sgn", "signbit", "floor", "ceil", "round", "trunc", "fix",
    "detach", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "allclose", "isclose", "equal",
    "bucketize", "searchsorted",
)
_TENSOR_PROPERTIES = ("shape", "dtype", "device", "ndim", "layout", "is_leaf", "is_cuda",
                      "is_sparse", "is_quantized", "is_meta", "names", "grad_fn", "itemsize", "nbytes")
_TORCH_FUNCTIONS = (
    "numel", "is_floating_point", "is_complex", "is_nonzero", "gt", "ge", "lt", "le", "eq", "ne", "greater",
    "greater_equal", "less", "less_equal", "not_equal", "isnan", "isinf", "isfinite", "isposinf", "isneginf",
    "isreal", "logical_not", "logical_and", "logical_or", "logical_xor", "any", "all", "count_nonzero",
    "nonzero", "argmax", "argmin", "argsort", "argwhere", "sign", "sgn", "signbit", "floor", "ceil", "round",
    "trunc", "fix", "detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "allclose", "isclose", "equal", "bucketize", "searchsorted", "result_type",
    "can_cast", "is_same_size", "histc",
)

register(*(getattr(torch.Tensor, n, None) for n in _TENSOR_METHODS))(constant)
register(*(getattr(getattr(torch.Tensor, n, None), "__get__", None) for n in _TENSOR_PROPERTIES))(constant)
register(*(getattr(torch, n, None) for n in _TORCH_FUNCTIONS))(constant)


@register(torch.Tensor.__repr__, torch.Tensor.__str__)
def _repr(func, args, kwargs):
    return f"JetTensor({func(primal(args[0]))})"


@register(torch.Tensor.requires_grad.__get__)
def _requires_grad(func, args, kwargs):
    """A traced tensor is being differentiated, as under ``torch.func.hessian``: code that then calls
    ``torch.autograd.grad`` on it leaves the forward Laplacian (and falls back to the exact path)."""
    return True


@register(torch.bincount, torch.Tensor.bincount)
def _bincount(func, args, kwargs):
    """Counts are constants; counts weighted by a traced tensor are not (and PyTorch has no rule for them)."""
    weights = args[1] if len(args) > 1 else kwargs.get("weights")
    if is_jet(weights):
        raise uncovered(func, "weights that depend on the differentiated argument")
    return constant(func, args, kwargs)
