"""Curvature-vector products: ``hvp``, ``ggn_vp``, ``fisher_vp``, ``empirical_fisher_vp``.

Each is ``(f, argnums=0, *, has_aux=False, ...) -> fn(*args, v, **kwargs)`` with the
tangent ``v`` shaped like ``args[argnums]`` (a tuple of pytrees when ``argnums`` is
a tuple). A complex ``v`` (real arguments) gets the complex-linear product
``M re(v) + i M im(v)``. ``hvp`` is forward-over-reverse where PyTorch's
forward-mode rules allow it; the others pull an output-space operator back through
the model (:mod:`secorder.operators.gauss_newton`), with reverse mode only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp
from torch.overrides import TorchFunctionMode

from .. import _checks, tree
from ..composites import ForwardModeUnsafe
from ..dataset import is_dataset_loss
from ..estimators import registry
from ..operators import make_operator
from ..operators import sharded as _sharded
from ..problem import Problem
from ..transformed import Transformed, signature_of
from . import _core
from .hints import per_example_hints
from ..progress import per_call

__all__ = ["hvp", "ggn_vp", "fisher_vp", "empirical_fisher_vp"]


def _split_call(args_and_v: tuple, name: str) -> tuple:
    if len(args_and_v) < 2:
        raise TypeError(f"the {name} function takes f's arguments followed by the tangent v")
    *args, v = args_and_v
    return tuple(args), v


def _check_tangent(v: Any, problem: Problem) -> None:
    tree.check_like(v, problem.primals, "v")
    for path, leaf in zip(tree.paths(v), tree.leaves(v)):
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(f"v{path} has dtype {leaf.dtype}; a tangent must be floating-point or complex")


def _explainer(name: str, transform: str) -> Callable[[tuple, dict], Any]:
    """``so.explain`` of a product: one route, one curvature-vector product (two for a complex ``v``)."""

    def explain(args_and_v: tuple, kwargs: dict) -> Any:
        from ..explain import Explanation

        _, v = _split_call(args_and_v, transform)
        products = 2 if any(leaf.is_complex() for leaf in tree.leaves(v)) else 1
        return Explanation(name, "generic", None, products, 0)

    return explain


def _linear_in_tangent(product: Callable[[Any], Any], v: Any, has_aux: bool) -> Any:
    """``product(v)``; for a complex ``v``, ``product(re v) + i product(im v)`` (the product is real-linear)."""
    if not any(leaf.is_complex() for leaf in tree.leaves(v)):
        return product(v)
    re = tree.tree_map(lambda t: t.real if t.is_complex() else t, v)
    im = tree.tree_map(lambda t: t.imag if t.is_complex() else torch.zeros_like(t), v)
    out_re, out_im = product(re), product(im)
    aux = None
    if has_aux:
        (out_re, aux), (out_im, _) = out_re, out_im
    out = tree.tree_map(torch.complex, out_re, out_im)
    return (out, aux) if has_aux else out


class _ForwardModeFailures(TorchFunctionMode):
    """While forward-over-reverse runs: an error raised inside a torch operation becomes ``ForwardModeUnsafe``.

    The choice of AD mode rests on what failed, not on the wording of a message:
    PyTorch's forward-mode rules of some operations mutate a ZeroTensor (``mse_loss``,
    linear layers with a constant weight: pytorch/pytorch issues 112013, 123996) or do
    not exist (``mkldnn_rnn_layer``), and some are wrong
    (:mod:`secorder.composites.forward_mode` raises ``ForwardModeUnsafe`` for those).
    Each of these is an error inside a torch call made under the forward-mode
    transform, which ``so.hvp`` answers by taking reverse-over-reverse (where a
    genuine error in a torch call is raised again). An error that ``f``'s own code
    raises outside torch operations is not converted: it reaches the caller at once,
    whatever its message says.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except ForwardModeUnsafe:
            raise
        except (RuntimeError, NotImplementedError) as err:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise ForwardModeUnsafe(f"{name} failed under forward mode: {type(err).__name__}: {err}") from err


def hvp(f: Callable[..., Any], argnums: _checks.Argnums = 0, *, has_aux: bool = False) -> Callable[..., Any]:
    """Hessian-vector product transform: ``hvp(f)(*args, v) = H v``.

    Args:
        f: a function returning a scalar tensor (``(scalar, aux)`` with ``has_aux``).
        argnums: which positional argument(s) to differentiate.
        has_aux: ``f`` returns ``(loss, aux)``; the function then returns ``(Hv, aux)``.

    Returns:
        ``fn(*args, v, **kwargs)``: ``H v`` shaped like ``v``, ``H`` the Hessian of ``f``
        with respect to ``args[argnums]``. Computed forward-over-reverse (``jvp`` of
        ``grad``, about two gradient evaluations); where a torch operation fails in
        forward mode (PyTorch's rule mutates a ZeroTensor: ``mse_loss``, linear layers
        with a frozen weight; no forward rule; a rule known to be wrong),
        reverse-over-reverse instead. An error raised by ``f``'s own code is raised.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (x ** 3).sum()
        >>> so.hvp(f)(torch.tensor([1., 2.]), torch.tensor([1., 1.]))
        tensor([ 6., 12.])
        >>> so.hvp(f)(torch.tensor([1., 2.]), torch.tensor([1j, 1.]))
        tensor([ 0.+6.j, 12.+0.j])
    """
    _core.check_common(f, argnums, has_aux, "hessian", 1)

    @per_example_hints
    @per_call(f, "hvp")
    def hvp_fn(*args_and_v: Any, **kwargs: Any) -> Any:
        args, v = _split_call(args_and_v, "hvp")
        problem = Problem(f, argnums, has_aux, args, kwargs)
        _check_tangent(v, problem)
        if is_dataset_loss(f):  # one pass of the summed Hessian operator over the data
            layout = _sharded.layout_of(f, problem.primals)
            with _sharded.gathered(problem, layout) as problem:
                v = _sharded.gather_tangent(layout, v)
                op = make_operator("hessian", problem)
                out = _linear_in_tangent(lambda t: _operator_product(op, problem, t), v, has_aux)
            return _sharded.export_tree(layout, out)
        _sharded.layout_of(f, problem.primals)  # sharded parameters need a data-set loss: a clear error

        def product(t: Any) -> Any:
            try:
                with _ForwardModeFailures():
                    return _forward_over_reverse(problem, t)
            except ForwardModeUnsafe:
                return _reverse_over_reverse(problem, t)

        return _linear_in_tangent(product, v, has_aux)

    fn = Transformed(hvp_fn, f, "hvp", signature_of(f, tangent="v"))
    fn._explain = _explainer(fn.__name__, "hvp")
    return fn


def _operator_product(op: Any, problem: Problem, v: Any) -> Any:
    """``op`` applied to the one tangent ``v`` (a probe batch of one), shaped like ``v``."""
    out = op.matvec([leaf[None] for leaf in tree.leaves(v)])
    return tree.unflatten(problem.spec, [r[0] for r in out])


def _forward_over_reverse(problem: Problem, v: Any) -> Any:
    if problem.has_aux:
        _, hv, aux = jvp(grad(problem.loss_and_aux, has_aux=True), (problem.primals,), (v,), has_aux=True)
        return hv, aux
    return jvp(grad(problem.loss), (problem.primals,), (v,))[1]


def _reverse_over_reverse(problem: Problem, v: Any) -> Any:
    if problem.has_aux:
        _, grad_vjp, aux = vjp(grad(problem.loss_and_aux, has_aux=True), problem.primals, has_aux=True)
        return grad_vjp(v)[0], aux
    _, grad_vjp = vjp(grad(problem.loss), problem.primals)
    return grad_vjp(v)[0]


def _curvature_vp(curvature: str, name: str, f: Callable[..., Any], argnums: Any, has_aux: bool,
                  mc_samples: int = 1, seed: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Callable[..., Any]:
    """The product transform of a curvature operator (one probe through its batched matvec)."""
    _core.check_common(f, argnums, has_aux, curvature, mc_samples)
    registry.check_random_source(seed, generator)
    options = registry.Options(seed=seed, generator=generator)

    @_core.eager_under_compile
    def run(args_and_v: tuple, kwargs: dict) -> Any:
        args, v = _split_call(args_and_v, name)
        problem = Problem(f, argnums, has_aux, args, kwargs)
        _check_tangent(v, problem)
        layout = _sharded.layout_of(f, problem.primals)
        with _sharded.gathered(problem, layout) as problem:
            v = _sharded.gather_tangent(layout, v)
            gen = _core.call_generator(options, problem)
            op = make_operator(curvature, problem, mc_samples=mc_samples, generator=gen)

            def product(t: Any) -> Any:
                leaves = [leaf[None] for leaf in tree.leaves(t)]
                out = tree.unflatten(problem.spec, [r[0] for r in op.matvec(leaves)])
                return problem.result(out)

            out = _linear_in_tangent(product, v, has_aux)
        return _sharded.export_tree(layout, out)

    @per_example_hints
    @per_call(f, name)
    def vp_fn(*args_and_v: Any, **kwargs: Any) -> Any:
        return run(args_and_v, kwargs)

    fn = Transformed(vp_fn, f, name, signature_of(f, tangent="v"))
    fn._explain = _explainer(fn.__name__, name)
    return fn


def ggn_vp(f: Callable[..., Any], argnums: _checks.Argnums = 0, *, has_aux: bool = False) -> Callable[..., Any]:
    """Generalised Gauss-Newton-vector product transform: ``ggn_vp(f)(params, inputs, targets, v) = G v``.

    Args:
        f: made by :func:`secorder.functional_loss` (the GGN needs the split into
            model and loss); any ``loss_fn`` (its output Hessian comes from autograd).
        argnums: the model's parameters (0, default) and/or inputs (1).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the function returns ``(Gv, aux)``.

    Returns:
        ``fn(*args, v, **kwargs)``: ``J^T H_L J v``, shaped like ``v``, with ``J`` the
        Jacobian of the model output and ``H_L`` the loss Hessian with respect to it.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> x, y = torch.tensor([[1., 2.]]), torch.zeros(1, 1)
        >>> so.ggn_vp(f)({"weight": torch.ones(1, 2)}, x, y, {"weight": torch.tensor([[1., 0.]])})
        {'weight': tensor([[2., 4.]])}
    """
    return _curvature_vp("ggn", "ggn_vp", f, argnums, has_aux)


def fisher_vp(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    has_aux: bool = False,
    mc_samples: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[..., Any]:
    """Monte-Carlo Fisher-vector product transform: ``fisher_vp(f)(params, inputs, targets, v) = F v``.

    Args:
        f: made by :func:`secorder.functional_loss` with a loss whose predictive
            distribution is known: cross-entropy, MSE or BCE with logits.
        argnums: the model's parameters (0, default) and/or inputs (1).
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        mc_samples: labels drawn per sample from the model's predictive distribution.
        seed: seeds the draw (same seed, same labels, same product).
        generator: a ``torch.Generator`` to draw from instead (advanced).

    Returns:
        ``fn(*args, v, **kwargs)``: ``(1/(M c)) sum_nm J_n^T g_nm g_nm^T J_n v`` with
        ``g_nm`` the gradients for the drawn labels (curvlinops' conventions; an
        unbiased estimate of ``ggn_vp``).

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(2, 3)
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> p, x, y = so.params_dict(model), torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
        >>> v = {k: torch.ones_like(t) for k, t in p.items()}
        >>> fv = so.fisher_vp(f, seed=0)(p, x, y, v)
        >>> torch.equal(fv["weight"], so.fisher_vp(f, seed=0)(p, x, y, v)["weight"])
        True
    """
    return _curvature_vp("fisher", "fisher_vp", f, argnums, has_aux, mc_samples, seed, generator)


def empirical_fisher_vp(
    f: Callable[..., Any], argnums: _checks.Argnums = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
    """Empirical Fisher-vector product transform: ``(1/c) sum_n g_n g_n^T v`` over per-sample gradients ``g_n``.

    Args:
        f: made by :func:`secorder.functional_loss` with cross-entropy, MSE or BCE
            with logits (their per-sample gradients are known in closed form).
        argnums: the model's parameters (0, default) and/or inputs (1).
        has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
        ``fn(*args, v, **kwargs)``: the empirical Fisher times ``v``, with ``c`` the
        loss's reduction factor (curvlinops' conventions).

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> x, y = torch.tensor([[1., 2.]]), torch.zeros(1, 1)
        >>> so.empirical_fisher_vp(f)({"weight": torch.ones(1, 2)}, x, y, {"weight": torch.tensor([[1., 0.]])})
        {'weight': tensor([[36., 72.]])}
    """
    return _curvature_vp("empirical_fisher", "empirical_fisher_vp", f, argnums, has_aux)
