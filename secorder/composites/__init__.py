"""Differentiable stand-ins for PyTorch operations whose higher-order rules are missing or wrong.

secorder differentiates ``f`` two or three times (products, estimators, spectra,
diagonals, the gradient of a curvature penalty), in reverse and forward mode. Some
of PyTorch's own rules do not survive that:

* the fused scaled-dot-product-attention kernels (flash, memory-efficient, the
  fused CPU kernel) that every current transformer calls have no double backward
  and no forward-mode rule;
* the third derivatives of ``layer_norm``, training-mode ``batch_norm`` and
  ``instance_norm`` are wrong (their double-backward formulas are not themselves
  differentiated correctly), and their double backward writes in place, which
  ``vmap`` refuses;
* the forward-mode rule of ``embedding`` ignores ``padding_idx``, so a
  forward-over-reverse Hessian-vector product is wrong (and not symmetric)
  where the padding token occurs.

While secorder evaluates ``f`` (every evaluation goes through
:meth:`secorder.problem.Problem.evaluate`), :func:`differentiable_ops` is active:
a :class:`torch.overrides.TorchFunctionMode`, which is per thread, that sends
each registered operation to a composite of primitive operations with correct
derivatives of every order. The user's code enters no context manager, and
nothing process-wide is switched: another thread running the same model at the
same time uses PyTorch's kernels as usual. Code that builds its own graph for
secorder (the legacy API's loss tensors) can enter :func:`differentiable_ops`
itself.

Registering a composite is one entry (:func:`register`); the tests check every
registered composite against the operation it replaces (values and first
derivatives) and its higher derivatives against finite differences.

Example:
    >>> import torch, torch.nn.functional as F, secorder as so
    >>> q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    >>> f = lambda q: F.scaled_dot_product_attention(q, q, q).pow(2).sum()
    >>> h = so.hvp(f)(q, torch.ones_like(q))          # no double backward in the fused kernel
    >>> with so.differentiable_ops():                   # the same product by hand
    ...     ref = torch.func.jvp(torch.func.grad(f), (q,), (torch.ones_like(q),))[1]
    >>> torch.allclose(h, ref)
    True
"""

from .registry import Composite, covered, lookup, register
from .forward_mode import ForwardModeUnsafe
from .mode import active, differentiable_ops
from . import activations, attention, distances, embedding, layout, linalg, losses, normalization  # noqa: F401
# (importing them registers the built-in composites)

__all__ = ["Composite", "register", "lookup", "covered", "differentiable_ops", "active", "ForwardModeUnsafe"]
