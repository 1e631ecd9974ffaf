"""Structured exact engine: Hessian, GGN and Fisher diagonals by curvature backpropagation.

For a model made of modules with a registered rule (a nested ``nn.Sequential``
of ``Linear``, ``Conv1d/2d``, pooling, ``Flatten``, ``BatchNorm`` in eval mode
and elementwise activations, and :class:`Residual` skip-connection blocks; for
transformers ``Embedding``, ``LayerNorm``, :class:`SelfAttention`,
:class:`PositionalEmbedding` and :class:`Parallel` branches, see
:mod:`.transformer`) and
a supported loss (cross-entropy, MSE, BCE with logits), the exact diagonal of
the Hessian of the loss with respect to the parameters costs a few backward
passes: the loss Hessian with respect to the network output is factored in
closed form and pulled back module by module, with the residual terms of the
nonlinear modules (Dangel, Harmeling, Hennig, "Modular Block-diagonal
Curvature Approximations for Feedforward Architectures", AISTATS 2020; Dangel,
Kunstner, Hennig, "BackPACK: Packing more into backprop", ICLR 2020). Dropping
the residual terms gives the exact generalized Gauss-Newton diagonal; sampled
or per-sample-gradient factor columns in place of the loss's give the
Monte-Carlo and the empirical Fisher diagonals. The engine is pure tensor code:
it runs inside ``torch.func.vmap`` (per-example or per-ensemble-member results
in one sweep), ``grad``/``jacrev`` and ``torch.compile`` (see :mod:`.dispatch`).
Users extend it with rules for their own modules (:func:`register_rule`,
:class:`Rule`, :mod:`.rules.example`).

Modules: :mod:`.dispatch` (the entry points), :mod:`.registry` (module type to
rule, :func:`register_rule`), :mod:`.rule` (the :class:`Rule` and
:class:`BlockRule` interfaces), :mod:`.rules` (the built-in rules, one module
per family, and :mod:`.rules.example`, a documented user rule),
:mod:`.curvature` (the factored per-sample curvature and its term kinds),
:mod:`.jacobians` (a module's Jacobian as the products the sweep needs),
:mod:`.losses` (loss-output factorisations), :mod:`.walker` (does a model
qualify; its plan), :mod:`.backprop` (the driver), :mod:`.blocks`
(``Residual``, ``Parallel``), :mod:`.tokens` (curvature per token, and the
Jacobians that keep it so), :mod:`.columns` (the column algebra of blocks),
:mod:`.transformer` (``SelfAttention`` and the modules to write a transformer with).

Example:
    >>> import torch
    >>> from secorder.structured import model_trace
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> bool(model_trace(model, torch.nn.CrossEntropyLoss(), x, y) >= 0)
    True
"""

from . import rules as _builtin_rules  # noqa: F401 (registers the built-in rules, before any walk)
from .blocks import Parallel, Residual
from .curvature import Curvature
from .dispatch import functional_call_diag, model_diagonal, model_trace
from .errors import Unsupported
from .jacobians import Jacobian
from .registry import register_rule, registered_rules, rule_for
from .rule import BlockRule, Rule
from .transformer import PositionalEmbedding, ScaledDotProductAttention, SelfAttention, Transpose

__all__ = [
    "model_diagonal", "model_trace", "functional_call_diag", "Unsupported", "Residual",
    "Rule", "BlockRule", "register_rule", "rule_for", "registered_rules", "Curvature", "Jacobian",
    "Parallel", "SelfAttention", "ScaledDotProductAttention", "PositionalEmbedding", "Transpose",
]
