"""Loss along one or two directions in parameter space (legacy ``torch_secorder.analysis.landscape``).

Each grid point is one forward pass, ``loss_fn(model(inputs), targets)`` at
``theta + alpha d1 (+ beta d2)``, evaluated with :func:`torch.func.functional_call`
on the shifted parameters: the model's own parameters are never written,
and the buffers each point sees are the model's buffers as they were before
the scan (a training-mode BatchNorm uses batch statistics; its running
statistics are neither carried from one point to the next nor left changed).
torch-secorder 0.0.1 wrote the shifted values into the parameters and
restored them at the end (not after an exception), and left training-mode
running statistics changed.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core import _common
from ..errors import LegacyTypeError, LegacyValueError

__all__ = ["compute_loss_surface_1d", "compute_loss_surface_2d", "create_random_direction"]


def _check_range(value: Any, name: str) -> Tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise LegacyTypeError(f"{name} must be a pair (min, max) of numbers, got {value!r}") from None
    for x in (lo, hi):
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, Tensor)):
            raise LegacyTypeError(f"{name} must be a pair (min, max) of numbers, got {value!r}")
    return lo, hi


def _check_num_points(num_points: Any) -> int:
    if isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral):
        raise LegacyTypeError(f"num_points must be a non-negative int, got {type(num_points).__name__}")
    if num_points < 0:
        raise LegacyValueError(f"num_points must be a non-negative int, got {num_points}")
    return int(num_points)


def _grid(value_range: Tuple[Any, Any], num_points: int, like: Tensor) -> Tensor:
    return torch.linspace(float(value_range[0]), float(value_range[1]), num_points, dtype=like.dtype, device=like.device)


class _Scan:
    """Evaluate the loss at shifted parameters, the model's parameters and buffers untouched."""

    def __init__(self, model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, directions: List[List[Tensor]]):
        _common.check_model(model)
        _common.check_callable(loss_fn, "loss_fn")
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        named = list(model.named_parameters())
        if not named:
            raise LegacyValueError("model has no parameters to move along a direction")
        self.names = [n for n, _ in named]
        self.base = [p.detach() for _, p in named]
        self.directions = [
            [u.detach().to(device=p.device, dtype=p.dtype) for u, p in zip(_common.check_vectors(d, self.base, name)[0], self.base)]
            for name, d in directions
        ]
        self.buffers = dict(model.named_buffers())

    def loss(self, coefficients: Tuple[Tensor, ...]) -> Tensor:
        state: Dict[str, Tensor] = {n: b.clone() for n, b in self.buffers.items()}
        for i, name in enumerate(self.names):
            value = self.base[i]
            for c, d in zip(coefficients, self.directions):
                value = value + c.to(value.dtype) * d[i]
            state[name] = value
        loss = self.loss_fn(functional_call(self.model, state, (self.inputs,)), self.targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise LegacyValueError(f"loss_fn must return a scalar tensor (one element), got {shape}")
        return loss.reshape(())


@_common.owns_forward
def compute_loss_surface_1d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    direction: List[Tensor],
    alpha_range: Tuple[float, float] = (-1.0, 1.0),
    num_points: int = 50,
) -> Tuple[Tensor, Tensor]:
    """Loss values along ``theta + alpha * direction`` for ``num_points`` evenly spaced ``alpha``.

    Args:
        model: the model; its parameters ``theta`` are the centre of the slice.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.
        direction: a list of tensors shaped like ``list(model.parameters())``.
        alpha_range: ``(min_alpha, max_alpha)``, both included.
        num_points: number of points (0 gives empty tensors).

    Returns:
        ``(alphas, losses)``, two 1-D tensors of length ``num_points``, in the
        parameters' dtype and on their device (0.0.1 returned float32 on the
        CPU: call ``.cpu()`` before ``.numpy()`` for a GPU model).

    The loss is evaluated without a graph; the model's parameters, buffers,
    train/eval flags and ``requires_grad`` are unchanged afterwards, also when
    ``loss_fn`` raises.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> x, y = torch.ones(1, 1), torch.zeros(1, 1)
        >>> alphas, losses = compute_loss_surface_1d(model, torch.nn.functional.mse_loss, x, y,
        ...                                          [torch.ones(1, 1)], alpha_range=(-1.0, 1.0), num_points=3)
        >>> alphas, losses                          # (1 + alpha)^2
        (tensor([-1.,  0.,  1.]), tensor([0., 1., 4.]))
    """
    scan = _Scan(model, loss_fn, inputs, targets, [("direction", direction)])
    num_points = _check_num_points(num_points)
    alphas = _grid(_check_range(alpha_range, "alpha_range"), num_points, scan.base[0])
    with torch.no_grad():
        losses = [scan.loss((a,)) for a in alphas]
    return alphas, (torch.stack(losses) if losses else alphas.new_zeros(0))


@_common.owns_forward
def compute_loss_surface_2d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    direction1: List[Tensor],
    direction2: List[Tensor],
    alpha_range: Tuple[float, float] = (-1.0, 1.0),
    beta_range: Tuple[float, float] = (-1.0, 1.0),
    num_points: int = 25,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Loss values on the grid ``theta + alpha * direction1 + beta * direction2``.

    Args:
        model: the model; its parameters ``theta`` are the centre of the plane.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.
        direction1: a list of tensors shaped like ``list(model.parameters())``.
        direction2: another such list.
        alpha_range: ``(min, max)`` of the coefficient of ``direction1``.
        beta_range: ``(min, max)`` of the coefficient of ``direction2``.
        num_points: points per axis.

    Returns:
        ``(alphas, betas, losses)``: two 1-D tensors of length ``num_points``
        and a ``(num_points, num_points)`` tensor with ``losses[i, j]`` at
        ``(alphas[i], betas[j])``; dtype and device as in
        :func:`compute_loss_surface_1d`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> x, y = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 1)
        >>> a, b, losses = compute_loss_surface_2d(model, torch.nn.functional.mse_loss, x, y,
        ...                                        [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 1.0]])],
        ...                                        num_points=3)
        >>> losses                                  # (alpha + beta)^2
        tensor([[4., 1., 0.],
                [1., 0., 1.],
                [0., 1., 4.]])
    """
    scan = _Scan(model, loss_fn, inputs, targets, [("direction1", direction1), ("direction2", direction2)])
    num_points = _check_num_points(num_points)
    alphas = _grid(_check_range(alpha_range, "alpha_range"), num_points, scan.base[0])
    betas = _grid(_check_range(beta_range, "beta_range"), num_points, scan.base[0])
    with torch.no_grad():
        rows = [torch.stack([scan.loss((a, b)) for b in betas]) for a in alphas] if num_points else []
    losses = torch.stack(rows) if rows else alphas.new_zeros((num_points, num_points))
    return alphas, betas, losses


def create_random_direction(model: nn.Module, *, generator: Optional[torch.Generator] = None) -> List[Tensor]:
    """A random direction shaped like ``list(model.parameters())``, each tensor of unit norm.

    Each parameter's block is a standard normal draw divided by its own norm
    (a block of norm zero, e.g. an empty tensor, stays zero), as in 0.0.1.
    The draws come from ``generator`` (keyword-only, an addition to 0.0.1)
    or, by default, from PyTorch's global generator, consumed exactly as
    0.0.1 did, so a seed gives 0.0.1's direction.

    Example:
        >>> import torch
        >>> d = create_random_direction(torch.nn.Linear(3, 2), generator=torch.Generator().manual_seed(0))
        >>> [tuple(t.shape) for t in d], [round(float(t.norm()), 6) for t in d]
        ([(2, 3), (2,)], [1.0, 1.0])
    """
    _common.check_model(model)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise LegacyTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        norm = torch.linalg.vector_norm(d)
        direction.append(torch.where(norm > 0, d / norm.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d)))
    return direction
