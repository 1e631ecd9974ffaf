"""The built-in rules, one module per family; importing this package registers them.

* :mod:`.linear`: ``nn.Linear``
* :mod:`.conv`: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` (groups, padding modes)
* :mod:`.batchnorm`: ``nn.BatchNorm1d/2d/3d`` (eval mode)
* :mod:`.activations`: ReLU, LeakyReLU, Tanh, Sigmoid, ELU, SiLU, GELU, Softplus
* :mod:`.elementwise`: LogSigmoid, SELU, PReLU, and derived-derivative rules (CELU, Softsign, Mish,
  Hardswish, Tanhshrink, Hardtanh, ReLU6, Hardsigmoid, Hardshrink, Softshrink, Threshold)
* :mod:`.pooling`: ``nn.MaxPool1d/2d/3d``, ``nn.AdaptiveMaxPool1d/2d/3d``, ``nn.AvgPool1d/2d/3d``,
  ``nn.AdaptiveAvgPool1d/2d/3d``
* :mod:`.padding`: ``nn.ZeroPad*d``, ``nn.ConstantPad*d``, ``nn.ReflectionPad*d``, ``nn.ReplicationPad*d``,
  ``nn.CircularPad*d``
* :mod:`.reshape`: ``nn.Flatten``, ``nn.Identity``, ``nn.Dropout`` (eval mode)
* :mod:`.residual`: :class:`secorder.Residual` (a block rule)
* :mod:`.parallel`: :class:`secorder.Parallel` (a block rule: summed or concatenated branches)
* :mod:`.layernorm`: ``nn.LayerNorm`` (per position)
* :mod:`.embedding`: ``nn.Embedding`` (first layer), :class:`secorder.PositionalEmbedding`
* :mod:`.attention`: :class:`secorder.structured.transformer.ScaledDotProductAttention` (inside :class:`secorder.SelfAttention`)
* :mod:`.permute`: :class:`secorder.Transpose`
* :mod:`.unsupported`: ``nn.RNN``/``LSTM``/``GRU`` and ``nn.MultiheadAttention``, declined with the reason
* :mod:`.backpack`: BackPACK's ``Pad``, ``Slicing``, ``Permute``, ``ScaleModule`` (imported on the first lookup
  of a module type of the ``backpack`` package, see :func:`~secorder.structured.registry.register_lazy`)
* :mod:`.example`: the documented example of a user rule (not imported here)
"""

from . import (  # noqa: F401 (registration)
    activations, batchnorm, conv, elementwise, linear, padding, pooling, reshape, residual,
)
from . import attention, embedding, layernorm, parallel, permute, unsupported  # noqa: F401 (registration)
from ..registry import register_lazy

register_lazy("backpack", __name__ + ".backpack")

__all__: list = []
