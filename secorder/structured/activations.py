"""First and second derivatives of the supported elementwise activations.

An elementwise activation ``a = phi(x)`` has a diagonal Jacobian ``diag(phi'(x))``
and, for each sample, a residual Hessian term ``diag(phi''(x) * dL/da)``
(Dangel, Harmeling, Hennig 2020, Sec. 3.2). ReLU and LeakyReLU are piecewise
linear: ``phi'' = 0`` away from the kink (and in autograd at it), so their
residual vanishes and their Hessian and GGN diagonals coincide.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

__all__ = ["ACTIVATIONS", "derivatives", "is_piecewise_linear"]

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.Softplus)


def is_piecewise_linear(module: nn.Module) -> bool:
    """``True`` for activations whose second derivative is zero (ReLU, LeakyReLU)."""
    return type(module) in (nn.ReLU, nn.LeakyReLU)


def _function(module: nn.Module) -> Callable[[Tensor], Tensor]:
    t = type(module)
    if t is nn.ELU:
        return lambda x: F.elu(x, module.alpha)
    if t is nn.SiLU:
        return F.silu
    if t is nn.GELU:
        return lambda x: F.gelu(x, approximate=module.approximate)
    if t is nn.Softplus:
        return lambda x: F.softplus(x, module.beta, module.threshold)
    raise TypeError(f"not an elementwise activation: {t.__name__}")


def derivatives(module: nn.Module, x: Tensor, second: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(phi(x), phi'(x), phi''(x) or None)`` for the activation ``module`` at ``x``.

    Closed forms for ReLU, LeakyReLU, Tanh and Sigmoid; the others by nested
    forward-mode derivatives of the same functional PyTorch evaluates (exact,
    elementwise, with tangent one).

    Example:
        >>> import torch
        >>> a, d1, d2 = derivatives(torch.nn.Tanh(), torch.zeros(2), second=True)
        >>> d1, d2
        (tensor([1., 1.]), tensor([-0., -0.]))
    """
    t = type(module)
    if t is nn.ReLU:
        return torch.relu(x), (x > 0).to(x.dtype), None
    if t is nn.LeakyReLU:
        pos = x > 0
        d1 = torch.where(pos, torch.ones_like(x), torch.full_like(x, module.negative_slope))
        return F.leaky_relu(x, module.negative_slope), d1, None
    if t is nn.Tanh:
        a = torch.tanh(x)
        d1 = 1 - a * a
        return a, d1, (-2 * a * d1 if second else None)
    if t is nn.Sigmoid:
        a = torch.sigmoid(x)
        d1 = a * (1 - a)
        return a, d1, (d1 * (1 - 2 * a) if second else None)
    fn = _function(module)
    ones = torch.ones_like(x)
    if not second:
        a, d1 = jvp(fn, (x,), (ones,))
        return a, d1, None

    def first(u: Tensor) -> Tuple[Tensor, Tensor]:
        return jvp(fn, (u,), (ones,))

    (a, d1), (_, d2) = jvp(first, (x,), (ones,))
    return a, d1, d2
