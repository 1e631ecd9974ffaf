"""The Hessian of ``f`` with respect to the differentiated arguments, as batched HVPs.

Matvecs are reverse-over-reverse: ``vjp(grad(f))`` at the primal point, built once
per call (per leaf for the diagonal blocks) and ``vmap``-ed over the probes. The
Hessian is symmetric, so the VJP of the gradient is the HVP; this needs no
forward-mode rule (``jvp``), which some PyTorch ops lack or get wrong
("ZeroTensors are immutable", pytorch/pytorch issues 112013 and 123996; no forward
AD for ``mkldnn_rnn_layer``). The products nest inside outer ``vmap``/``grad``.
"""

from __future__ import annotations

from typing import Any, Callable, List

from torch import Tensor
from torch.func import grad, vjp

from .base import LeafOperator
from ._linearize import LastLinearization, over_probes, restrict

__all__ = ["hessian_operator", "build"]


def hessian_operator(loss_of_leaves: Callable[[List[Tensor]], Tensor], leaves: List[Tensor]) -> LeafOperator:
    """The Hessian of ``loss_of_leaves`` at ``leaves``, as batched HVPs.

    Args:
        loss_of_leaves: maps a list of tensors (the flattened differentiated argument)
            to a scalar.
        leaves: the primal point.

    Returns:
        A :class:`~secorder.operators.base.LeafOperator` (not flagged PSD).

    Example:
        >>> import torch
        >>> op = hessian_operator(lambda xs: (xs[0] ** 3).sum(), [torch.tensor([1., 2.])])
        >>> op.block_matvec(0, torch.eye(2))   # Hessian diag(6 x)
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    leaves = list(leaves)

    def make(key: Any) -> Any:
        fn, primal = restrict(loss_of_leaves, leaves, key)
        return vjp(grad(fn), primal)  # (the gradient, its VJP: the HVP)

    lin = LastLinearization(make, leaves)

    def matvec(V: List[Tensor]) -> List[Tensor]:
        grad_vjp = lin(None)[1]
        return over_probes(lambda v: grad_vjp(v)[0], list(V))

    def block_matvec(index: int, V: Tensor) -> Tensor:
        block_vjp = lin(index)[1]
        return over_probes(lambda v: block_vjp(v)[0], V)

    def top_hint() -> List[Tensor]:
        """The gradient, a by-product of the linearisation (see :class:`LeafOperator`)."""
        return list(lin(None)[0])

    return LeafOperator(templates=leaves, matvec=matvec, block_matvec=block_matvec, top_hint=top_hint,
                        probe_bytes=lin.probe_bytes)


def build(problem: Any, *, mc_samples: int = 1, generator: Any = None) -> LeafOperator:
    """The Hessian of the call's ``f`` (registered as ``"hessian"``)."""
    return hessian_operator(problem.loss_of_leaves, problem.leaves)
