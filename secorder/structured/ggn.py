"""The exact generalized Gauss-Newton diagonal and trace as transforms: ``ggn_diag``, ``ggn_trace``.

For ``f(params, inputs, targets) = loss_fn(model(inputs; params), targets)``
(a :class:`secorder.FunctionalLoss`) the GGN is ``J^T H_L J`` with ``J`` the
Jacobian of the model output with respect to ``params`` and ``H_L`` the
Hessian of the loss with respect to the output (Schraudolph 2002, "Fast
curvature matrix-vector products for second-order gradient descent"). The
structured engine computes its diagonal by backpropagating the factored
``H_L`` without the activations' residual terms; models it does not support
take the generic path, one-hot GGN-vector products ``J^T (H_L (J v))``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from .. import _checks, tree
from ..estimators import exact
from ..modules import FunctionalLoss
from ..operators import LeafOperator
from . import hook

__all__ = ["ggn_diag", "ggn_trace", "ggn_operator"]


def ggn_operator(f: FunctionalLoss, params: Dict[str, Tensor], inputs: Any, targets: Any,
                 buffers: Optional[Dict[str, Tensor]] = None) -> LeafOperator:
    """The GGN of ``f`` at ``params`` as a :class:`~secorder.operators.LeafOperator` (generic path).

    Leaves are ``params``' values in :func:`secorder.tree.flatten` order.

    Example:
        >>> import torch, secorder as so
        >>> f = so.functional_loss(torch.nn.Linear(2, 1, bias=False), torch.nn.MSELoss(reduction="sum"))
        >>> op = ggn_operator(f, {"weight": torch.ones(1, 2)}, torch.tensor([[1., 2.]]), torch.zeros(1, 1))
        >>> op.block_matvec(0, torch.eye(2).reshape(2, 1, 2))
        tensor([[[2., 4.]],
        <BLANKLINE>
                [[4., 8.]]])
    """
    leaves, spec = tree.flatten(params)
    model = f.model
    state = dict(model.named_buffers()) if buffers is None else dict(buffers)

    def output(new_leaves: List[Tensor]) -> Tensor:
        s = dict(state)
        s.update(tree.unflatten(spec, new_leaves))
        return functional_call(model, s, (inputs,))

    def loss_of_output(out: Tensor) -> Tensor:
        return f.loss_fn(out, targets)

    def ggn_vp(out_fn: Callable[[Any], Tensor], primal: Any) -> Callable[[Any], Any]:
        out, pullback = vjp(out_fn, primal)
        _, h_out = vjp(grad(loss_of_output), out)

        def mv(v: Any) -> Any:
            jv = jvp(out_fn, (primal,), (v,))[1]
            return pullback(h_out(jv)[0])[0]

        return mv

    def matvec(V: List[Tensor]) -> List[Tensor]:
        return vmap(ggn_vp(output, leaves))(list(V))

    def block_matvec(index: int, V: Tensor) -> Tensor:
        def out_of_leaf(x: Tensor) -> Tensor:
            return output(leaves[:index] + [x] + leaves[index + 1:])

        return vmap(ggn_vp(out_of_leaf, leaves[index]))(V)

    return LeafOperator(templates=leaves, matvec=matvec, block_matvec=block_matvec)


def _generic(f: Any, args: tuple, argnums: Any) -> LeafOperator:
    if argnums not in (0, -len(args)) or isinstance(argnums, bool):
        raise ValueError(f"argnums={argnums!r}: the GGN is taken with respect to params (argnums=0) only")
    if len(args) not in (3, 4):
        raise TypeError(f"f takes (params, inputs, targets[, buffers]), got {len(args)} arguments")
    params = args[0]
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of name -> tensor, got {type(params).__name__}")
    _checks.check_differentiable(params, argnums)
    return ggn_operator(f, params, args[1], args[2], args[3] if len(args) == 4 else None)


def _check_f(f: Any) -> None:
    if not isinstance(f, FunctionalLoss):
        raise TypeError(
            f"the GGN needs the model/loss split: f must come from so.functional_loss(model, loss_fn), "
            f"got {type(f).__name__}"
        )


def ggn_diag(f: FunctionalLoss, argnums: int = 0, *, chunk_size: Optional[int] = None,
             engine: str = "auto") -> Callable[..., Dict[str, Tensor]]:
    """Exact GGN diagonal transform: ``ggn_diag(f)(params, inputs, targets)`` is shaped like ``params``.

    ``f`` must come from :func:`secorder.functional_loss`. ``engine`` and the
    ``last_engine`` attribute behave as in :func:`secorder.hessian_diag`; the
    generic path uses one-hot GGN-vector products, ``chunk_size`` per batch.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> f = so.functional_loss(model, torch.nn.functional.cross_entropy)
        >>> params, x, y = so.params_dict(model), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
        >>> d = so.ggn_diag(f)(params, x, y)
        >>> sorted(d) == sorted(params), so.ggn_diag(f).__name__
        (True, 'ggn_diag_fn')
    """
    _check_f(f)
    _checks.check_chunk_size(chunk_size)
    hook.check_engine(engine)

    def ggn_diag_fn(*args: Any) -> Dict[str, Tensor]:
        hit = hook.attempt(ggn_diag_fn, f, argnums, False, args, engine, "ggn", False, "ggn_diag")
        if hit is not None:
            return hit
        op = _generic(f, args, argnums)
        return tree.unflatten(tree.flatten(args[0])[1], exact.exact_diagonal(op, chunk_size))

    ggn_diag_fn.last_engine = None
    return ggn_diag_fn


def ggn_trace(f: FunctionalLoss, argnums: int = 0, *, chunk_size: Optional[int] = None,
              engine: str = "auto") -> Callable[..., Tensor]:
    """Exact GGN trace transform: ``ggn_trace(f)(params, inputs, targets)`` is a 0-dim tensor.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(2, 1)
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> so.ggn_trace(f)(so.params_dict(model), torch.ones(1, 2), torch.zeros(1, 1))
        tensor(6.)
    """
    _check_f(f)
    _checks.check_chunk_size(chunk_size)
    hook.check_engine(engine)

    def ggn_trace_fn(*args: Any) -> Tensor:
        hit = hook.attempt(ggn_trace_fn, f, argnums, False, args, engine, "ggn", True, "ggn_trace")
        if hit is not None:
            return hit
        return exact.exact_trace(_generic(f, args, argnums), chunk_size)

    ggn_trace_fn.last_engine = None
    return ggn_trace_fn
