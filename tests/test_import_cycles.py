"""No import cycles in secorder (issue 24): the module-level imports form a graph without cycles, and the modules
that used to import each other import alone in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Set

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> Dict[str, pathlib.Path]:
    found = {}
    for path in (ROOT / "secorder").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(module: str, path: pathlib.Path, modules: Dict[str, pathlib.Path], *,
                     deferred: bool = False) -> Set[str]:
    """The secorder modules ``module`` imports when it is imported (module level; not under TYPE_CHECKING).

    With ``deferred``, also the imports inside functions and under ``TYPE_CHECKING``: the
    cycles such imports hide.
    """
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    deps: Set[str] = set()
    tree = ast.parse(path.read_text())
    stack: List[ast.AST] = list(ast.walk(tree)) if deferred else list(tree.body)
    while stack:
        node = stack.pop()
        if deferred:
            pass
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("secorder")}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("secorder"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in modules else target)
    return {d for d in deps if d in modules and d != module}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {m: _runtime_imports(m, p, modules) for m, p in modules.items()}
    assert "secorder.structured.walker" in graph["secorder.structured.backprop"]  # the graph is read for real
    assert _cycles(graph) == []


def test_the_untangled_modules_have_no_cycle_even_through_deferred_imports():
    # structured/rule.py <-> backprop.py <-> walker.py <-> rules/*, jacobians.py <-> tokens.py,
    # forward_laplacian/jet.py <-> registry.py: not even through a function-level or TYPE_CHECKING import.
    modules = _modules()
    names = [m for m in modules if m.startswith(("secorder.structured.rule", "secorder.forward_laplacian.jet",
                                                 "secorder.forward_laplacian.registry"))
             or m in ("secorder.structured.backprop", "secorder.structured.walker", "secorder.structured.jacobians",
                      "secorder.structured.tokens", "secorder.structured.registry")]
    graph = {m: _runtime_imports(m, modules[m], modules, deferred=True) & set(names) for m in names}
    assert len(names) > 20 and _cycles(graph) == []


UNTANGLED = [
    "secorder.structured.rule", "secorder.structured.backprop", "secorder.structured.walker",
    "secorder.structured.rules.residual", "secorder.structured.jacobians", "secorder.structured.tokens",
    "secorder.forward_laplacian.jet", "secorder.forward_laplacian.registry", "secorder.transformed",
    "secorder.explain",
]


def test_each_formerly_tangled_module_imports_alone_in_a_fresh_interpreter():
    # One interpreter imports torch once, then forks a fresh child per module (a fresh secorder each time).
    script = (
        "import os, sys, traceback, torch\n"
        f"mods = {UNTANGLED!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            __import__(m)\n"
        "        except BaseException:\n"
        "            traceback.print_exc()\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        bad.append(m)\n"
        "print('FAILED', bad) if bad else print('OK')\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout + run.stderr
