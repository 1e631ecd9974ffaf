"""Batched matvecs: the one interface between curvature matrices and estimators.

An estimator never sees a model or autograd. It sees a :class:`LeafOperator`: a
symmetric linear operator on a list of leaf tensors (a flattened pytree), given by

* ``templates``: one tensor per leaf (shape, dtype and device of the operand),
* ``matvec(V)``: ``H V`` for a probe batch ``V`` (each leaf with a leading probe
  dimension ``k``),
* ``block_matvec(i, V_i)``: ``H_ii V_i`` (a tensor with a leading probe dimension) for the diagonal block of leaf ``i`` alone,
  which is all that a one-hot column of leaf ``i`` needs for the diagonal, and is
  cheaper than a full matvec (no tangents or gradients for the other leaves).

The functional transforms build it with :func:`hessian_operator`; the legacy
``torch_secorder`` shim builds one on the autograd engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

from torch import Tensor
from torch.func import grad, vjp, vmap

__all__ = ["LeafOperator", "hessian_operator"]


@dataclass(frozen=True)
class LeafOperator:
    """A symmetric operator on lists of leaf tensors, with batched (block) matvecs.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2., 1.], [1., 3.]])
        >>> op = LeafOperator(
        ...     templates=[torch.zeros(2)],
        ...     matvec=lambda V: [V[0] @ A],
        ...     block_matvec=lambda i, Vi: Vi @ A,
        ... )
        >>> op.matvec([torch.eye(2)])[0]
        tensor([[2., 1.],
                [1., 3.]])
    """

    templates: Sequence[Tensor]
    matvec: Callable[[List[Tensor]], List[Tensor]]
    block_matvec: Callable[[int, Tensor], Tensor]

    @property
    def sizes(self) -> List[int]:
        return [t.numel() for t in self.templates]

    @property
    def dim(self) -> int:
        return sum(self.sizes)


def hessian_operator(loss_of_leaves: Callable[[List[Tensor]], Tensor], leaves: List[Tensor]) -> LeafOperator:
    """The Hessian of ``loss_of_leaves`` at ``leaves``, as batched HVPs.

    ``loss_of_leaves`` maps a list of tensors (the flattened differentiated
    argument) to a scalar. Matvecs are reverse-over-reverse,
    ``vmap(vjp(grad(loss)))`` over the probe dimension (the Hessian is
    symmetric, so the VJP of the gradient is the HVP); they nest inside outer
    ``vmap``/``grad`` transforms.

    Example:
        >>> import torch
        >>> op = hessian_operator(lambda xs: (xs[0] ** 3).sum(), [torch.tensor([1., 2.])])
        >>> op.block_matvec(0, torch.eye(2))   # Hessian diag(6 x)
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    leaves = list(leaves)

    def matvec(V: List[Tensor]) -> List[Tensor]:
        # Reverse-over-reverse (see block_matvec): the forward and backward pass at
        # the primal point run once per batch of probes, not once per probe.
        _, grad_vjp = vjp(grad(loss_of_leaves), leaves)
        return vmap(lambda v: grad_vjp(v)[0])(list(V))

    def block_matvec(index: int, V: Tensor) -> Tensor:
        def loss_of_leaf(x: Tensor) -> Tensor:
            return loss_of_leaves(leaves[:index] + [x] + leaves[index + 1 :])

        # Reverse-over-reverse: one forward and backward pass at the primal point,
        # then the linear map v -> H_ii v vmapped over the probes. Forward-over-
        # reverse trips PyTorch's "ZeroTensors are immutable" error for some ops
        # (mse_loss, linear layers whose weight is a constant; pytorch/pytorch
        # issues 112013 and 123996) and was slower here.
        _, block_vjp = vjp(grad(loss_of_leaf), leaves[index])
        return vmap(lambda v: block_vjp(v)[0])(V)

    return LeafOperator(templates=leaves, matvec=matvec, block_matvec=block_matvec)
