"""The graph walker: the structured engine on a traced ATen graph, for models the module walker declines.

When a model is not a chain of modules with rules (its wiring is written in
``forward``: Hugging Face and torchvision ResNets, functional calls, ``torch.cat``,
a mean over space), :func:`functional_call_diag` traces it once per input
structure (:mod:`.trace`: ``torch.export`` in non-strict mode), binds a rule to
every node that depends on a differentiated parameter (:mod:`.ops`, the registry
``OP_RULES`` of one rule per ATen operation, most of them mapping onto the module
rules' math) and runs the curvature sweep over the graph (:mod:`.sweep`: fan-out
with its cross terms). Declines raise
:class:`~secorder.structured.errors.Unsupported` naming the ATen operation and
the source line.

Example:
    >>> import torch, secorder as so
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    ...     def forward(self, x):
    ...         return self.b(torch.relu(self.a(x)) + x)
    >>> f = so.functional_loss(Net(), torch.nn.CrossEntropyLoss())
    >>> fn = so.ggn_diag(f)
    >>> d = fn(so.params_dict(f.model), torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    >>> fn.last_engine, sorted(d)
    ('structured', ['a.bias', 'a.weight', 'b.bias', 'b.weight'])
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
from torch import Tensor, nn

from ..errors import Unsupported
from ..walker import check_plain
from ..losses import LossSpec
from . import sweep as _sweep
from .ops import OP_RULES, LinearOp, ModuleOp, OpRule
from .trace import output_values, traced

__all__ = ["functional_call_diag", "OP_RULES", "OpRule", "ModuleOp", "LinearOp"]


def _output_index(t: Any, model_out_field: Any, spec_flat: list) -> int:
    from ...model_call import select_output

    rebuilt = output_values(t, spec_flat)
    try:
        chosen = select_output(rebuilt, model_out_field)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise Unsupported(f"cannot select the output: {err}") from None
    for i, v in enumerate(spec_flat):
        if v is chosen:
            return i
    raise Unsupported("output= computes a new tensor from the model's return value; the graph walker takes an "
                      "output the model returns (None, or a field name)")


def _aliases(model: nn.Module) -> Dict[str, str]:
    """``{other name: first name}`` of the tensors the model holds under several names (tied weights)."""
    first: Dict[int, str] = {}
    out: Dict[str, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if id(t) in first and first[id(t)] != name:
            out[name] = first[id(t)]
        else:
            first.setdefault(id(t), name)
    return out


def _check_plain(model: nn.Module) -> None:
    """Hooks and instance-level overrides send a model to the generic path, as on the module path.

    The exported graph would contain forward hooks and overridden ``forward``
    methods, but not backward hooks, and what a hook does to state is not part
    of a graph: the graph walker, like the module walker, proves nothing about
    such a model.
    """
    from torch.nn.modules import module as _impl

    if (_impl._global_forward_hooks or _impl._global_forward_pre_hooks or _impl._global_backward_hooks
            or _impl._global_backward_pre_hooks):
        raise Unsupported("global module hooks are registered")
    for name, m in model.named_modules():
        check_plain(m, f"module {name or '<root>'!r}")
        if m.training and isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) and getattr(m, "p", 1.0) != 0:
            # A random model is not traced: its masks differ per call (the generic path replays one per call),
            # and torch.export saves and restores the global RNG while it traces, which would repeat the
            # random draws of another thread made meanwhile.
            raise Unsupported(f"module {name or '<root>'!r} ({type(m).__name__}) draws random numbers in "
                              "training mode")


def functional_call_diag(model: nn.Module, output: Any, spec: LossSpec, values: Dict[str, Tensor], inputs: Any,
                         targets: Any, wanted: Set[str], trace: bool, *, kind: str,
                         factor_chunk_size: Optional[int] = None, loss_fn: Any = None, mc_samples: int = 1,
                         generator: Optional[torch.Generator] = None, check_only: bool = False) -> Any:
    """The structured diagonal (``{qualified name: tensor}``) or trace of ``model`` on its traced graph.

    ``values`` maps every parameter and buffer name of ``model`` to the tensor to
    use, ``wanted`` the names to differentiate; ``output`` is the
    ``output=`` of the :class:`~secorder.FunctionalLoss`. Raises
    :class:`Unsupported` when the model cannot be traced or an operation of the
    graph has no rule. With ``check_only`` (what :func:`secorder.explain` runs), it
    traces and plans the graph, which is where it declines, and returns ``None``.

    Example:
        >>> import torch
        >>> from secorder.structured.losses import loss_spec
        >>> net = torch.nn.Linear(2, 1)
        >>> vals = {"weight": torch.tensor([[1., 2.]]), "bias": torch.tensor([0.])}
        >>> functional_call_diag(net, None, loss_spec(torch.nn.MSELoss()), vals, torch.ones(1, 2),
        ...                      torch.zeros(1, 1), {"weight", "bias"}, False, kind="hessian")
        {'weight': tensor([[2., 2.]]), 'bias': tensor([2.])}
    """
    _check_plain(model)
    if callable(output):  # exported with the model: the graph's one output is what the loss takes
        t = traced(model, inputs, output)
        if t.out_spec.num_leaves != 1:
            raise Unsupported("output= returned more than one tensor")
        index = 0
    else:
        t = traced(model, inputs)
        probes = [torch.empty(0) for _ in range(t.out_spec.num_leaves)]
        index = _output_index(t, output, probes)
    p = _sweep.plan(t, set(wanted), index, kind == "hessian", _aliases(model))
    if check_only:
        return None
    return _sweep.run(p, spec, values, inputs, targets, set(wanted), trace, kind=kind,
                      factor_chunk_size=factor_chunk_size, loss_fn=loss_fn, mc_samples=mc_samples,
                      generator=generator)
