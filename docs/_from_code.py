"""Parts of the docs generated from the code at build time, so that they cannot drift (run by ``conf.py``).

* ``_generated/cli_commands.part.rst``: every ``secorder`` command of
  ``secorder.cli.main.COMMANDS`` with its description, ``--help`` verbatim and
  the keys of its JSON output (its ``JSON_LAYOUT``, e.g.
  ``secorder.cli.report.JSON_LAYOUT``, as a nested list; ``tests/test_cli.py``
  checks a real report against it). A new command appears on the CLI page
  with no edit of the page.
* ``_generated/composites.part.rst``: the operations :mod:`secorder.composites`
  replaces while secorder differentiates ``f``, and why (from its registry).
* ``_generated/forward_mode.part.rst``: the operations whose forward-mode rules
  ``so.hvp`` avoids (:mod:`secorder.composites.forward_mode`, from its registry).
* ``_generated/cli_report_sample.part.rst``, ``cli_fallback_sample.part.rst``,
  ``cli_usage_error_sample.part.rst``, ``cli_factory_error_sample.part.rst``: what
  ``secorder report`` prints, from runs of the command during the build (in-process,
  :func:`secorder.cli.main`): the default report, the line saying why the fast engine
  did not run (on :func:`fallback_problem`, a model with a layer the fast engine has no
  rule for), and two errors (:func:`cli_samples`).
* ``_generated/graph_ops.part.rst``: the ATen operations the structured
  engine's graph walker has a rule for, with what each rule is
  (:data:`secorder.structured.graph.OP_RULES`).
* ``_generated/registered_curvatures.part.rst``, ``registered_estimators.part.rst``,
  ``registered_structured_rules.part.rst``, ``registered_laplacian_ops.part.rst``: the
  entries of the registries (:class:`secorder.registry.Registry`) of curvatures,
  estimators, structured-engine module rules and forward-Laplacian operations. A new
  entry appears on its page with no edit of the page.
* ``_generated/extras.part.rst``: the optional extras of ``pyproject.toml``
  with what each installs, and what each is for (:data:`EXTRA_PURPOSES`;
  ``tests/test_docs.py`` fails when an extra has no purpose written here).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
from typing import Any, Dict, List

#: What each extra of pyproject.toml is for; the packages come from pyproject.toml itself.
EXTRA_PURPOSES: Dict[str, str] = {
    "cli": "the ``secorder report`` default problem (scikit-learn's digits) and its progress bars",
    "test": "running the test suite, which also runs the command line and builds this site",
    "docs": "building this site",
    "bench": "what the benchmark peers need (see :doc:`benchmarks`)",
    "plot": "``SpectralDensity.plot`` and ``secorder spectrum --out`` (see :doc:`spectra`)",
}


def _layout_lines(layout: Dict[str, Any], depth: int) -> List[str]:
    lines = []
    pad = "  " * depth
    for key, value in layout.items():
        if isinstance(value, dict):
            lines += [f"{pad}* ``{key}``: an object with", ""] + _layout_lines(value, depth + 1) + [""]
        elif isinstance(value, list):
            lines += [f"{pad}* ``{key}``: a list of objects with", ""] + _layout_lines(value[0], depth + 1) + [""]
        else:
            lines.append(f"{pad}* ``{key}``: {value}")
    return lines


def json_layout_rst(layout: Dict[str, Any]) -> str:
    """A nested bullet list of a command's ``JSON_LAYOUT``.

    Example:
        >>> print(json_layout_rst({"a": "one", "b": {"c": "two"}}))
        * ``a``: one
        * ``b``: an object with
        <BLANKLINE>
          * ``c``: two
        <BLANKLINE>
    """
    text = "\n".join(_layout_lines(layout, 0))
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def extras(pyproject: pathlib.Path) -> Dict[str, List[str]]:
    """``{extra: [requirement, ...]}`` from ``[project.optional-dependencies]`` of ``pyproject``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed package's metadata says the same
        from importlib.metadata import requires

        found: Dict[str, List[str]] = {}
        for req in requires("secorder") or []:
            spec, _, marker = req.partition(";")
            match = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if match:
                found.setdefault(match.group(1), []).append(spec.strip())
        return found
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh)["project"]["optional-dependencies"])


def extras_rst(found: Dict[str, List[str]]) -> str:
    """The extras as a list-table: extra, what it is for, what it installs.

    Example:
        >>> print(extras_rst({"docs": ["sphinx>=7"]}))
        .. list-table::
           :header-rows: 1
        <BLANKLINE>
           * - extra
             - for
             - installs
           * - ``docs``
             - building this site
             - ``sphinx>=7``
        <BLANKLINE>
    """
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - extra", "     - for", "     - installs"]
    for name, reqs in found.items():
        purpose = EXTRA_PURPOSES.get(name, "*(not described yet: add it to docs/_from_code.py)*")
        lines += [f"   * - ``{name}``", f"     - {purpose}", "     - " + ", ".join(f"``{r}``" for r in reqs)]
    return "\n".join(lines) + "\n"


def _write(target: pathlib.Path, text: str) -> None:
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")


def _help_text(parser: Any) -> str:
    """``parser.format_help()`` at a fixed width (argparse wraps to the terminal's), as a literal block."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "90"
    try:
        text = parser.format_help().rstrip()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return ".. code-block:: text\n\n" + "\n".join(f"   {line}".rstrip() for line in text.splitlines()) + "\n"


def commands_rst() -> str:
    """One section per ``secorder`` command: its description, ``--help`` and JSON keys (the CLI page's reference)."""
    from secorder.cli.main import build_parser, command_modules

    parsers = build_parser().commands
    out = []
    for name, module in command_modules().items():
        title = f"``secorder {name}``"
        out += [title, "~" * len(title), "", module.DESCRIPTION, "", "Options (``--help``):", "", _help_text(parsers[name])]
        layout = getattr(module, "JSON_LAYOUT", None)
        if layout is not None:
            out += ["Keys of the ``--json`` object:", "", json_layout_rst(layout)]
    return "\n".join(out)


def composites_rst() -> str:
    """The table of :mod:`secorder.composites`: each replaced callable and what is wrong with PyTorch's rule.

    Example:
        >>> "scaled_dot_product_attention" in composites_rst()
        True
    """
    from secorder.composites.registry import COMPOSITES, _name

    rows = sorted({(_name(func), entry.why) for func, entry in COMPOSITES.items()})
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - PyTorch callable", "     - why secorder replaces it", ""]
    for name, why in rows:
        lines += [f"   * - ``{name}``", f"     - {why}"]
    return "\n".join(lines) + "\n"


def forward_mode_rst() -> str:
    """The table of :mod:`secorder.composites.forward_mode`: the operations ``so.hvp`` takes in reverse mode.

    Example:
        >>> "scatter_reduce" in forward_mode_rst()
        True
    """
    from secorder.composites.forward_mode import UNSAFE
    from secorder.composites.registry import _name

    rows = {}
    for func, entry in UNSAFE.items():
        rows.setdefault(entry.why, []).append(f"``{_name(func)}``")
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - PyTorch callables", "     - what is wrong", ""]
    for why, names in rows.items():
        lines += [f"   * - {', '.join(sorted(set(names)))}", f"     - {why}"]
    return "\n".join(lines) + "\n"


class Scale(__import__("torch").nn.Module):
    """A layer of the user's own, for which the fast (structured) engine has no rule."""

    def __init__(self, n: int):
        import torch

        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: Any) -> Any:
        return __import__("torch").sinh(x) * self.scale  # no rule for sinh on either walker of the fast engine


def fallback_problem():
    """A ``--model`` factory whose model has a layer of its own (``Scale``): the report falls back to HVPs."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), Scale(16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(64, 8)
    return model, torch.nn.functional.cross_entropy, (x, x[:, :3].argmax(1))


def not_scalar_problem():
    """A ``--model`` factory whose loss is not a scalar (``reduction='none'``): a one-line error."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 10)
    return model, torch.nn.MSELoss(reduction="none"), (x, x[:, :1] ** 2)


def _run_cli(argv: List[str]) -> Any:
    import contextlib
    import io

    from secorder.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _literal(text: str, language: str = "text") -> str:
    return f".. code-block:: {language}\n\n" + "\n".join(f"   {line}".rstrip() for line in text.splitlines()) + "\n"


def cli_samples() -> Dict[str, str]:
    """``{part name: rst}`` of the CLI page's sample outputs, each from a real run of ``secorder report``."""
    samples = {}
    rc, out, err = _run_cli(["report", "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"secorder report failed while building the docs: {err}")
    samples["cli_report_sample"] = _literal(out.rstrip())
    module = __name__ if __name__ != "__main__" else "_from_code"
    rc, out, err = _run_cli(["report", "--no-progress", "--model", f"{module}:fallback_problem", "--steps", "0",
                             "--num-samples", "2"])
    line = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith("exact curvature")), None)
    if rc != 0 or line is None:
        raise RuntimeError(f"secorder report on fallback_problem failed while building the docs: {err}")
    samples["cli_fallback_sample"] = _literal(line)
    rc, out, err = _run_cli(["report", "--lr", "nan"])
    lines = err.strip().splitlines()
    samples["cli_usage_error_sample"] = _literal("\n".join(
        ["$ secorder report --lr nan", lines[0] + (" ..." if len(lines) > 2 else ""), lines[-1]]), "console")
    rc, out, err = _run_cli(["report", "--model", f"{module}:not_scalar_problem"])
    samples["cli_factory_error_sample"] = _literal("\n".join(
        ["$ secorder report --model problem.py:make", err.strip().replace(f"{module}:not_scalar_problem",
                                                                          "problem.py:make")]), "console")
    return samples


def graph_ops_rst() -> str:
    """The graph walker's covered ATen operations (its registry ``OP_RULES``), one row per operation.

    Example:
        >>> "``aten.conv2d.default``" in graph_ops_rst()
        True
    """
    from secorder.structured.graph import OP_RULES

    lines = [".. list-table::", "   :header-rows: 1", "", "   * - ATen operation", "     - rule", ""]
    for name in sorted(OP_RULES.names()):
        doc = getattr(OP_RULES.get(name), "doc", "") or ""
        lines += [f"   * - ``{name}``", f"     - {doc}"]
    return "\n".join(lines) + "\n"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for i, row in enumerate([header] + rows):
        lines += [f"   * - {row[0] or ' '}"] + [f"     - {cell or ' '}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


def curvatures_rst() -> str:
    """The registered curvatures (:data:`secorder.operators.CURVATURES`), one row each.

    Example:
        >>> "``empirical_fisher``" in curvatures_rst()
        True
    """
    from secorder.operators import CURVATURES

    rows = [[f"``{name}``", c.summary, "yes" if c.needs_split else "no", "yes" if c.sampled else "no"]
            for name, c in CURVATURES.items()]
    return _table(["curvature=", "what", "needs so.functional_loss", "random"], rows)


def estimators_rst() -> str:
    """The registered methods (:data:`secorder.estimators.registry.ESTIMATORS`) of both quantities.

    Example:
        >>> "``xnystrace``" in estimators_rst()
        True
    """
    from secorder.estimators import registry

    rows = []
    for quantity in registry.QUANTITIES:
        for row in registry.table(quantity):
            rows.append([f"``{row['method']}``", quantity, row["summary"],
                         "" if row["default_samples"] is None else str(row["default_samples"]),
                         row["citation"]])
    return _table(["method=", "quantity", "what", "default num_samples", "source"], rows)


def structured_rules_rst() -> str:
    """The module types with a structured-engine rule (:data:`secorder.structured.registry.RULES`).

    Example:
        >>> "``torch.nn.Conv2d``" in structured_rules_rst()
        True
    """
    import secorder.structured  # noqa: F401 (registers the built-in rules)
    from secorder.structured.registry import RULES

    def name(t: Any) -> str:
        module = "torch.nn" if t.__module__.startswith("torch.nn.") else t.__module__
        return f"``{module}.{t.__qualname__}``"

    rows = [[name(t), f"``{rule.__name__}``"] for t, rule in RULES.items()]
    return _table(["module type", "rule"], rows)


def laplacian_ops_rst() -> str:
    """The callables with a forward-Laplacian rule (:func:`secorder.forward_laplacian.registry.covered`).

    Example:
        >>> "``torch.sin``" in laplacian_ops_rst()
        True
    """
    from secorder.forward_laplacian.registry import covered

    import textwrap

    return "\n".join(textwrap.wrap(", ".join(f"``{name}``" for name in covered()), 100)) + "\n"


def write_code_parts(root: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Write the commands' reference, the CLI's sample outputs, the extras and the composites tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in cli_samples().items():
        _write(out_dir / f"{name}.part.rst", text)
    _write(out_dir / "composites.part.rst", composites_rst())
    _write(out_dir / "forward_mode.part.rst", forward_mode_rst())
    _write(out_dir / "graph_ops.part.rst", graph_ops_rst())
    _write(out_dir / "cli_commands.part.rst", commands_rst())
    _write(out_dir / "extras.part.rst", extras_rst(extras(root / "pyproject.toml")))
    _write(out_dir / "registered_curvatures.part.rst", curvatures_rst())
    _write(out_dir / "registered_estimators.part.rst", estimators_rst())
    _write(out_dir / "registered_structured_rules.part.rst", structured_rules_rst())
    _write(out_dir / "registered_laplacian_ops.part.rst", laplacian_ops_rst())
