"""Modules the engine recognises and declines, each with the reason (the fallback reports it).

* ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: they return ``(output, hidden)`` tuples, so a
  plain ``nn.Sequential`` cannot chain them, and their recurrence mixes the time
  steps through a state; BackPACK covers them for the GGN diagonal only. Not
  implemented here: the generic path computes their exact diagonals.
* ``nn.MultiheadAttention``: it takes ``(query, key, value)`` and returns a tuple;
  :class:`secorder.SelfAttention` is the same function as ``mha(x, x, x)[0]`` (copy
  ``in_proj_weight``/``in_proj_bias``/``out_proj`` over) and is structured.
"""

from __future__ import annotations

from torch import nn

from ..errors import Unsupported
from ..registry import register_rule
from ..rule import Rule

__all__ = ["DeclinedRule"]

_REASONS = {
    nn.RNN: "is a recurrent layer: RNN/LSTM/GRU return (output, hidden) tuples and mix time steps through "
            "their state; the structured engine does not implement them (the generic path is exact)",
    nn.MultiheadAttention: "takes (query, key, value) and returns a tuple; write self-attention as "
                           "so.SelfAttention (the same function as mha(x, x, x)[0]), which the engine takes",
}
_REASONS[nn.LSTM] = _REASONS[nn.GRU] = _REASONS[nn.RNN]


class DeclinedRule(Rule):
    """Declines its module with the reason of :data:`_REASONS`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        raise Unsupported(_REASONS[type(module)])


for _t in _REASONS:
    register_rule(_t, DeclinedRule)
