"""The propagation rules, one module per family of operations (importing them registers them).

* :mod:`.activations` -- entrywise nonlinearities (``tanh``, ``sin``, ``softplus``, ``sigmoid``,
  the ReLU family, GELU, SiLU, ``exp``, ``log``, ...) by their first two derivatives;
* :mod:`.arithmetic` -- sums, products, quotients and powers of tensors and numbers;
* :mod:`.linear_algebra` -- linear layers, matmul and friends, ``einsum``, convolutions;
* :mod:`.reductions` -- sums, means, norms, ``logsumexp``, ``softmax``, maxima;
* :mod:`.shape` -- reshapes, permutations, indexing, concatenation, padding, conversions;
* :mod:`.normalization` -- ``layer_norm``, ``batch_norm`` in evaluation mode, inactive dropout;
* :mod:`.constants` -- metadata, comparisons and other results without a derivative.

The builders in :mod:`.common` (:func:`elementwise`, :func:`linear`,
:func:`multilinear`, :func:`constant`) are what a new rule is usually made of.
"""

from . import activations, arithmetic, constants, linear_algebra, normalization, reductions, shape
from .common import constant, elementwise, linear, multilinear

__all__ = ["elementwise", "linear", "multilinear", "constant"]
