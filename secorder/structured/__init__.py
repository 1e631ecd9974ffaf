"""Structured exact engine: Hessian and GGN diagonals by curvature backpropagation.

For a model made of supported layers (a nested ``nn.Sequential`` of
``Linear``, ``Conv1d/2d``, pooling, ``Flatten``, ``BatchNorm`` in eval mode and
elementwise activations, and :class:`Residual` skip-connection blocks) and a supported loss (cross-entropy, MSE, BCE with
logits), the exact diagonal of the Hessian of the loss with respect to the
parameters costs a few backward passes: the loss Hessian with respect to the
network output is factored in closed form and pulled back layer by layer, with
the activations' residual terms (Dangel, Harmeling, Hennig, "Modular
Block-diagonal Curvature Approximations for Feedforward Architectures",
AISTATS 2020; Dangel, Kunstner, Hennig, "BackPACK: Packing more into
backprop", ICLR 2020). Dropping the residual terms gives the exact
generalized Gauss-Newton diagonal.

Modules: :mod:`.losses` (loss-output factorisations), :mod:`.curvature`
(the factored per-sample curvature), :mod:`.activations`, :mod:`.rules`
(per-module rules), :mod:`.blocks` (``Residual``), :mod:`.walker` (does a model qualify), :mod:`.backprop`
(the driver), :mod:`.dispatch` (entry points), :mod:`.generic` (the one-hot
GGN fallback).

Example:
    >>> import torch
    >>> from secorder.structured import model_trace
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> bool(model_trace(model, torch.nn.CrossEntropyLoss(), x, y) >= 0)
    True
"""

from .blocks import Residual
from .dispatch import functional_call_diag, model_diagonal, model_trace
from .errors import Unsupported

__all__ = ["model_diagonal", "model_trace", "functional_call_diag", "Unsupported", "Residual"]
