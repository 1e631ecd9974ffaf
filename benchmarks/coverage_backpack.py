"""How many of BackPACK's own DiagHessian / DiagGGN test problems the structured engine takes, and exactly.

Run: ``python -m benchmarks.coverage_backpack PATH`` with ``PATH`` a checkout of
BackPACK's source (``github.com/f-dangel/backpack``; its ``test`` package holds
the settings). Options: ``--json`` (one JSON object instead of the tables),
``--verbose`` (one line per case), ``--tol=1e-10``.

For every module-loss case of ``test/extensions/secondorder/diag_hessian``
(``DiagHESSIAN_SETTINGS``, run as ``so.hessian_diag``) and
``test/extensions/secondorder/diag_ggn`` (``DiagGGN_SETTINGS``, run as
``so.ggn_diag``), built by BackPACK's own problem class in float64 on the CPU, the
script records which engine ran (``fn.last_engine``), why the structured engine
declined (``fn.last_fallback_reason``), and, when it ran, the relative error
``||d - d_generic|| / ||d_generic||`` against the generic one-hot path. A case
counts as covered when it ran structured and is within ``--tol``.

Nothing of BackPACK is copied: its settings are imported from the checkout. Two
imports of its test package need packages its test extra installs and this
environment may lack: ``pytorch_memlab`` (only for a memory helper: stubbed
here) and ``torchvision`` (for the ``ResNet2`` case: stubbed so that the settings
import; the case then fails to build and counts as not covered, with that reason).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import types
from collections import Counter
from typing import Any, Dict, List


def _stub_missing(name: str, **attrs: Any) -> None:
    """Insert a placeholder module ``name`` (and its parents) when the real one is not installed."""
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = types.ModuleType(sub)
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[sub])
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def _unavailable(package: str):
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{package} is not installed")

    def fn(*args, **kwargs):
        raise RuntimeError(f"{package} is not installed")

    return Unavailable, fn


def load_settings(checkout: str):
    """``{"DiagHessian": [problem, ...], "DiagGGN": [...]}``, BackPACK's test problems from ``checkout``."""
    if not os.path.isdir(os.path.join(checkout, "test", "extensions", "secondorder")):
        raise SystemExit(f"{checkout!r} is not a BackPACK source checkout (no test/extensions/secondorder)")
    sys.path.insert(0, os.path.abspath(checkout))
    for mod in [m for m in sys.modules if m == "test" or m.startswith("test.")]:
        del sys.modules[mod]  # the standard library's regression-test package, if something imported it
    _stub_missing("pytorch_memlab", MemReporter=_unavailable("pytorch_memlab")[0])
    block, conv1x1 = _unavailable("torchvision")
    _stub_missing("torchvision.models.resnet", BasicBlock=block, conv1x1=conv1x1)
    from test.extensions.problem import make_test_problems
    from test.extensions.secondorder.diag_ggn.diag_ggn_settings import DiagGGN_SETTINGS
    from test.extensions.secondorder.diag_hessian.diagh_settings import DiagHESSIAN_SETTINGS

    return {"DiagHessian": make_test_problems(DiagHESSIAN_SETTINGS),
            "DiagGGN": make_test_problems(DiagGGN_SETTINGS)}


def run_case(problem: Any, kind: str, tol: float) -> Dict[str, Any]:
    """One case: which engine ran, why not the structured one, and its error against the generic path."""
    import torch

    import secorder as so

    out: Dict[str, Any] = {"kind": kind}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # BackPACK's converter reports its steps
            out["id"] = " ".join(problem.make_id().split())
            problem.set_up()
    except Exception as err:  # noqa: BLE001 (a case BackPACK's settings cannot build here)
        out.update(engine="not built", reason=f"{type(err).__name__}: {err}", covered=False)
        out.setdefault("id", problem.id_prefix or "?")
        return out
    model, x, y, loss_fn = problem.model, problem.input, problem.target, problem.loss_function
    f = so.functional_loss(model, loss_fn)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    transform = so.hessian_diag if kind == "hessian" else so.ggn_diag
    fn = transform(f)
    try:
        d = fn(params, x, y)
    except Exception as err:  # noqa: BLE001
        out.update(engine="error", reason=f"{type(err).__name__}: {err}", covered=False)
        return out
    out["engine"], out["reason"] = fn.last_engine, fn.last_fallback_reason
    if fn.last_engine == "structured":
        ref = transform(f, engine="generic")(params, x, y)
        a = torch.cat([d[k].reshape(-1) for k in params])
        b = torch.cat([ref[k].reshape(-1) for k in params])
        err = ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()
        out["rel_err"] = err
        out["covered"] = err <= tol
    else:
        out["covered"] = False
    problem.tear_down()
    return out


def _short_reason(reason: str) -> str:
    """The module type and why, without the module's position (to group cases)."""
    if reason and reason.startswith("module '") and "' (" in reason:
        return reason[reason.index("' (") + 2:]
    return reason or ""


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.coverage_backpack PATH_TO_BACKPACK_CHECKOUT [--json] [--verbose]")
    tol = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--tol=")), 1e-10)
    import torch

    torch.set_default_dtype(torch.float64)
    problems = load_settings(args[0])
    results: List[Dict[str, Any]] = []
    for name, kind in (("DiagHessian", "hessian"), ("DiagGGN", "ggn")):
        for p in problems[name]:
            r = run_case(p, kind, tol)
            r["list"] = name
            results.append(r)
            if "--verbose" in sys.argv:
                err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
                print(f"{name:11s} {r['engine']:10s} {err:8s} {r['id'][:90]} {r.get('reason') or ''}"[:240],
                      flush=True)
    summary = {}
    for name in ("DiagHessian", "DiagGGN"):
        rs = [r for r in results if r["list"] == name]
        summary[name] = {"cases": len(rs), "structured": sum(r["engine"] == "structured" for r in rs),
                         "covered": sum(r["covered"] for r in rs)}
    total = {k: sum(s[k] for s in summary.values()) for k in ("cases", "structured", "covered")}
    errs = [r["rel_err"] for r in results if "rel_err" in r]
    falls = Counter(_short_reason(r.get("reason")) for r in results if not r["covered"])
    if "--json" in sys.argv:
        print(json.dumps({"summary": summary, "total": total, "max_rel_err": max(errs, default=None),
                          "not_covered": dict(falls), "cases": results}, indent=1))
        return
    print("| settings | cases | structured | exact (covered) |")
    print("|---|---|---|---|")
    for name, s in list(summary.items()) + [("total", total)]:
        print(f"| {name} | {s['cases']} | {s['structured']} | {s['covered']} ({100 * s['covered'] / max(s['cases'], 1):.0f}%) |")
    print(f"\nlargest relative error against the generic path: {max(errs, default=float('nan')):.1e}")
    print("\nnot covered (cases, reason):")
    for reason, n in falls.most_common():
        print(f"  {n:3d}  {reason}")


if __name__ == "__main__":
    main()
