"""The built-in rules, one module per family; importing this package registers them.

* :mod:`.linear`: ``nn.Linear``
* :mod:`.conv`: ``nn.Conv1d``, ``nn.Conv2d``
* :mod:`.batchnorm`: ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` (eval mode)
* :mod:`.activations`: ReLU, LeakyReLU, Tanh, Sigmoid, ELU, SiLU, GELU, Softplus
* :mod:`.pooling`: ``nn.MaxPool2d``, ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``
* :mod:`.reshape`: ``nn.Flatten``, ``nn.Identity``, ``nn.Dropout`` (eval mode)
* :mod:`.residual`: :class:`secorder.Residual` (a block rule)
* :mod:`.example`: the documented example of a user rule (not imported here)
"""

from . import activations, batchnorm, conv, linear, pooling, reshape, residual  # noqa: F401 (registration)

__all__: list = []
