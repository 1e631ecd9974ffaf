"""Collection rules for the doctest run over the package (``--doctest-modules``).

Modules that exist only to serve an optional third-party package are skipped
when that package is absent (a fresh ``pip install -e ".[test]"`` has no BackPACK).
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("backpack") is None:
    collect_ignore.append("secorder/structured/rules/backpack.py")
