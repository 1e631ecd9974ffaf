"""The Laplacian transform ``so.laplacian`` and the forward-Laplacian interpreter behind it.

* :mod:`.transform` -- the public :func:`laplacian` (methods, fallback, options);
* :mod:`.forward` -- one pass: seed the input's directions, run ``f``, read the Laplacian;
* :mod:`.jet` -- the carrier tensor and the interpreter that hands each torch call to its rule;
* :mod:`.registry` -- ``{torch callable: rule}``, extensible with :func:`register`;
* :mod:`.rules` -- the rules, one module per family of operations.
"""

from . import rules  # noqa: F401  (registers the rules)
from .jet import UncoveredOperation
from .registry import covered, register
from .transform import laplacian

__all__ = ["laplacian", "UncoveredOperation", "register", "covered"]
