"""Collection rules for the doctest run over the package (``--doctest-modules``).

Modules that exist only to serve an optional third-party package are skipped
when that package is absent (a fresh ``pip install -e ".[test]"`` has no BackPACK).
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("backpack") is None:
    collect_ignore.append("secorder/structured/rules/backpack.py")

# One intra-op thread for the whole run. The suite's problems are small, where a second
# thread only adds synchronisation, and on a machine whose cores are busy with other work
# every op's thread team waits for a free core: a 227-parameter Hessian-vector product
# measured 2 ms with one thread and 200 ms with two under load. Tests that need threads
# (the multi-process ones) set their own in their subprocesses.
import torch  # noqa: E402

torch.set_num_threads(1)
