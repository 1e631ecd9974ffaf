"""The two rule interfaces: :class:`Rule` for a leaf module, :class:`BlockRule` for a module made of models.

A rule tells the structured engine how to differentiate one module type; the
registry (:mod:`secorder.structured.registry`) maps module types to rule
classes, and the driver (:mod:`secorder.structured.backprop`) knows no rule by
name.

A leaf rule's life in one call of the engine:

1. ``rule = YourRule(module)`` when the model is walked: check the module's
   configuration, raise :class:`~secorder.structured.errors.Unsupported` with a
   reason if the rule cannot handle it (the engine then falls back to the
   generic path and reports the module's name and the reason).
2. ``z, state = rule.forward(x, tensors)`` in the forward pass: ``tensors`` maps
   the module's own parameter and buffer names to the values of this call (the
   differentiated ones and the constants). Return the output and a typed state
   (a dataclass) with whatever the backward needs.
3. In the backward sweep, from the curvature ``curv`` at the module's output
   (a :class:`~secorder.structured.curvature.Curvature`, per sample):
   ``rule.parameter_diagonal(state, curv, wanted)`` (and ``parameter_trace``)
   for the wanted parameters; ``rule.jacobian(state)`` to pull the curvature
   and the loss gradient back to the input; ``rule.residual(state, grad_out)``,
   for the exact Hessian only, the second-order term of a module nonlinear in
   its input (``sum_i (dL/dz_i) d^2 z_i / dx^2``).

Every operation must be a pure tensor function (no in-place updates of
inputs, no ``.item()``, hooks or ``torch.autograd.grad``) so that the engine
runs under ``torch.func.vmap``/``grad`` and ``torch.compile``; the tests of
``tests/test_structured_compose.py`` turn batching-rule fallback warnings into
errors. Decline (raise ``Unsupported``) only in ``__init__`` or ``forward``:
the Monte-Carlo Fisher's labels are drawn between the forward and the backward
pass, and a fallback after the draw would draw them again.

Adding a rule, step by step (:mod:`secorder.structured.rules.example` is a
complete one):

1. a state dataclass, and a subclass of :class:`Rule` with ``parameters``
   (and ``has_residual`` if the module is nonlinear in its input);
2. ``forward``, ``jacobian`` (a class of :mod:`~secorder.structured.jacobians`;
   ``Columns`` or ``Columns.from_vjp`` fit any module, the others keep
   curvature terms cheap), ``residual`` if nonlinear, ``parameter_diagonal``
   (through ``curv.diagonal()`` or ``curv.quadratic(X)``);
3. ``register_rule(ModuleType, YourRule)`` in a module imported by
   :mod:`secorder.structured.rules` (built-in) or by your code (user rules);
4. one line in ``SETTINGS`` of ``tests/test_structured_rules.py`` (a factory
   and an input shape): the products, every term kind's pull-back, the
   residual and the parameter diagonal are then checked against autograd.

A new kind of Jacobian is a subclass of
:class:`~secorder.structured.jacobians.Jacobian` with ``t_columns`` (and
``pull_*`` overrides where a term kind can stay cheap); a new kind of
curvature term is a subclass of :class:`~secorder.structured.curvature.Term`
whose ``pulled`` asks the Jacobian for an optional ``pull_<kind>`` method and
falls back to ``jac.pull_factor(self.as_factor())`` (as ``SoftmaxFactor`` and
``Tokenwise`` do), so that no existing Jacobian has to change.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, FrozenSet, Generic, List, Mapping, Optional, Protocol, Tuple, TypeVar

from torch import Tensor, nn

from .curvature import Curvature, Term
from .jacobians import Jacobian

__all__ = ["Rule", "BlockRule", "Sweep"]

StateT = TypeVar("StateT")


class Sweep(Protocol):
    """What a :class:`BlockRule` sees of the engine's sweep (:class:`secorder.structured.backprop.Sweep`).

    Declared here, so that the rules need not import the driver (which imports
    the walker, which imports the rules). ``plan`` is a
    :class:`secorder.structured.walker.Plan`.
    """

    def run(self, plan: Any, x: Tensor) -> Tuple[Tensor, List[Any]]:
        """The plan's output for input ``x`` and its per-step states."""
        ...

    def pull(self, plan: Any, states: List[Any], curv: Curvature, g: Optional[Tensor],
             need_input: bool, need_grad_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        """Pull ``curv`` (and the gradient ``g``) back through ``plan``, recording the wanted diagonals."""
        ...


class Rule(Generic[StateT]):
    """How the structured engine differentiates one leaf module (subclass it, then register it).

    Class attributes:
        parameters: the local names of the module parameters whose diagonal the
            rule computes. A module with any other parameter declines.
        has_residual: ``True`` when the output is nonlinear in the input, so
            that the exact Hessian has a residual term at this module (set it per
            instance in ``__init__`` when it depends on the module).

    Example: the documented example rule, for ``ScaledTanh``,
    ``z = scale * tanh(x)`` with a learnable scalar ``scale``
    (:mod:`secorder.structured.rules.example` walks through it):

        >>> import torch, secorder as so
        >>> from secorder.structured.rules.example import ScaledTanh
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), ScaledTanh())
        >>> f = so.functional_loss(model, torch.nn.MSELoss())
        >>> fn = so.hessian_diag(f)
        >>> d = fn(so.params_dict(model), torch.randn(4, 3), torch.randn(4, 2))
        >>> fn.last_engine, sorted(d)
        ('structured', ['0.bias', '0.weight', '1.scale'])
    """

    parameters: ClassVar[Tuple[str, ...]] = ()
    has_residual: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, StateT]:
        """The module's output for input ``x`` (``[N, *in]``) and the state the backward needs."""
        raise NotImplementedError

    def jacobian(self, state: StateT) -> Jacobian:
        """The output's Jacobian with respect to the input, per sample."""
        raise NotImplementedError

    def residual(self, state: StateT, grad_out: Tensor) -> Optional[Term]:
        """The residual curvature at the input, given ``dL/dz`` (only called when ``has_residual``)."""
        return None

    def parameter_diagonal(self, state: StateT, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        """``{local name: diagonal}`` for the ``wanted`` parameters, shaped like them.

        ``curv`` is the curvature at the module's output. For a module linear in
        its parameters the diagonal is ``sum_n J_n^T H_n J_n`` restricted to the
        diagonal: :meth:`Curvature.diagonal` and :meth:`Curvature.quadratic`
        give it without knowing how ``curv`` is stored.
        """
        return {}

    def parameter_trace(self, state: StateT, curv: Curvature, wanted: FrozenSet[str]) -> Tensor:
        """The sum of :meth:`parameter_diagonal` (override when it has a cheaper form)."""
        parts = [d.sum() for d in self.parameter_diagonal(state, curv, wanted).values()]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


class BlockRule(Generic[StateT]):
    """How the engine differentiates a module made of sub-models (a skip connection, parallel branches).

    The walker plans each sub-model named by :meth:`bodies` like a model of its
    own and hands the plans to the constructor; the rule combines their forward
    and backward passes through the :class:`~secorder.structured.backprop.Sweep`
    it is given (``sweep.run`` and ``sweep.pull``), so the driver needs no
    knowledge of the block. See :class:`~secorder.structured.rules.residual.ResidualRule`.
    """

    def __init__(self, module: nn.Module, plans: Mapping[str, Any]) -> None:  # plans: walker.Plan
        self.module = module
        self.plans = dict(plans)

    @classmethod
    def bodies(cls, module: nn.Module) -> Dict[str, nn.Module]:
        """The sub-models, by (dotted) sub-module name, each planned as a model; nothing else may hold parameters."""
        raise NotImplementedError

    def forward(self, x: Tensor, sweep: "Sweep") -> Tuple[Tensor, StateT]:
        raise NotImplementedError

    def backward(self, state: StateT, curv: Curvature, grad_out: Optional[Tensor], sweep: "Sweep",
                 need_input: bool, need_grad_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        """Pull the curvature (and, if given, the gradient) back through the block.

        Every sub-plan must be pulled with ``sweep.pull`` (that is where the
        parameter diagonals inside it are recorded). With ``need_input=False``
        nothing before the block needs the curvature at its input: return
        ``(None, None)`` and let each body stop at its first wanted parameter.
        """
        raise NotImplementedError

