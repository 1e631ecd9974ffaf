"""Legacy API: our ``torch_secorder`` against torch-secorder 0.0.1, on the same inputs.

Run: ``python -m benchmarks.bench_legacy`` (``--quick`` for fewer warm calls,
``--rows mlp20`` to restrict the workloads, ``--functions full_jacobian,eig1``
to restrict the functions). Workloads are the MLP 20-64-5 and 784-32-10
cross-entropy rows of :mod:`benchmarks.workloads` (batch 64). Functions:

* ``closure``: ``core.hessian_trace.hessian_trace`` on a closure (the generic
  path: it cannot see the model), both rows;
* ``model``: ``core.hessian_trace.model_hessian_trace`` (ours uses the
  structured engine where the model qualifies, as these do), both rows;
* ``full_jacobian``: ``core.gvp.full_jacobian`` of the model's outputs
  (64 x 5 = 320 rows) on 20-64-5;
* ``per_layer``: ``core.per_layer_curvature.per_layer_hessian_diagonal`` on 784-32-10;
* ``empirical_fisher``: ``approximations.empirical_fisher_diagonal`` on 784-32-10;
* ``eig1`` / ``eig3``: ``analysis.estimate_eigenvalues`` top-1 / top-3 (Lanczos,
  default ``num_iterations=100``, ``tol=1e-6``) on 784-32-10, with the
  eigenvalues each implementation returns against a float64 reference (ours in
  float64 at ``tol=1e-10``).

Every measurement runs single-threaded (``OMP_NUM_THREADS=1`` unless set) in its
own process, one per (function, implementation, row); the old package
runs with its isolated install first on ``PYTHONPATH`` and each worker asserts
which ``torch_secorder`` it imported. Calls of 0.0.1 that take seconds get a
single timed call (its "warm" column is then that call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.workloads import ROWS, classification

OURS_DIR = Path(__file__).resolve().parent.parent / "torch_secorder"


def _import(peer: bool):
    import torch_secorder

    where = Path(torch_secorder.__file__).resolve().parent
    if peer:
        assert "bench_peers" in str(where), f"expected torch-secorder 0.0.1, imported {where}"
        assert torch_secorder.__version__ == "0.0.1", torch_secorder.__version__
    else:
        assert where == OURS_DIR, f"expected our torch_secorder at {OURS_DIR}, imported {where}"
    return torch_secorder


def _eig_loss(model, data, target):
    return F.cross_entropy(model(data), target)


def _closure_case(row: str, peer: bool):
    _import(peer)
    from torch_secorder.core.hessian_trace import hessian_trace

    model, x, y = classification(**ROWS[row])
    params = list(model.parameters())
    return lambda: hessian_trace(lambda: F.cross_entropy(model(x), y), params)


def _model_case(row: str, peer: bool):
    _import(peer)
    from torch_secorder.core.hessian_trace import model_hessian_trace

    model, x, y = classification(**ROWS[row])
    return lambda: model_hessian_trace(model, F.cross_entropy, x, y)


def _full_jacobian_case(row: str, peer: bool):
    ts = _import(peer)
    model, x, _ = classification(**ROWS[row])
    params = list(model.parameters())
    return lambda: ts.full_jacobian(lambda: model(x), params)


def _per_layer_case(row: str, peer: bool):
    ts = _import(peer)
    model, x, y = classification(**ROWS[row])
    return lambda: ts.per_layer_hessian_diagonal(model, F.cross_entropy, x, y)


def _empirical_fisher_case(row: str, peer: bool):
    ts = _import(peer)
    model, x, y = classification(**ROWS[row])
    return lambda: ts.empirical_fisher_diagonal(model, F.cross_entropy, x, y)


def _eig_case(k: int):
    def make(row: str, peer: bool):
        ts = _import(peer)
        model, x, y = classification(**ROWS[row])

        def call():
            torch.manual_seed(0)
            return ts.estimate_eigenvalues(model, _eig_loss, x, y, num_eigenvalues=k)[0]

        return call

    return make


# function -> (case factory, label, rows, warm calls of 0.0.1 per row)
FUNCTIONS = {
    "closure": (_closure_case, "`core.hessian_trace.hessian_trace` (closure)", ("mlp20", "mlp784"), {"mlp784": 0}),
    "model": (_model_case, "`core.hessian_trace.model_hessian_trace`", ("mlp20", "mlp784"), {"mlp784": 0}),
    "full_jacobian": (_full_jacobian_case, "`core.gvp.full_jacobian` (outputs, 320 rows)", ("mlp20",), {}),
    "per_layer": (_per_layer_case, "`per_layer_hessian_diagonal`", ("mlp784",), {"mlp784": 0}),
    "empirical_fisher": (_empirical_fisher_case, "`empirical_fisher_diagonal`", ("mlp784",), {}),
    "eig1": (_eig_case(1), "`estimate_eigenvalues` top-1", ("mlp784",), {}),
    "eig3": (_eig_case(3), "`estimate_eigenvalues` top-3", ("mlp784",), {}),
}

CASES = {}
for _fn, (_make, _label, _rows, _old_warm) in FUNCTIONS.items():
    for _row in _rows:
        CASES[f"ours:{_fn}:{_row}"] = (lambda m, r: lambda: m(r, False))(_make, _row)
        CASES[f"old:{_fn}:{_row}"] = (lambda m, r: lambda: m(r, True))(_make, _row)


def _values_main(name: str) -> None:
    """Worker: print the eigenvalues of case ``name`` (or of the float64 reference) as JSON."""
    if name.startswith("ref:"):
        k = int(name.split(":")[1][len("eig"):])
        ts = _import(False)
        model, x, y = classification(**ROWS[name.split(":")[2]])
        model, x = model.double(), x.double()
        values = ts.estimate_eigenvalues(model, _eig_loss, x, y, num_eigenvalues=k, tol=1e-10, num_iterations=2000,
                                         generator=torch.Generator().manual_seed(0))[0]
    else:
        torch.manual_seed(0)
        values = CASES[name]()()
    print("VALUES " + json.dumps([float(v) for v in values]))


def _values(name: str, peer: bool) -> list:
    env = dict(os.environ)
    paths = [str(harness.REPO)] + ([str(harness.peer_path("torch_secorder_001"))] if peer else [])
    if peer:
        paths.reverse()
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_legacy", "--values", name],
                          cwd=str(harness.PEERS if peer else harness.REPO), env=env, capture_output=True, text=True,
                          timeout=3600)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("VALUES "):
            return json.loads(line[len("VALUES "):])
    raise RuntimeError(f"values of {name} failed:\n{proc.stderr[-3000:]}")


def _fmt(values: list) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in values) + "]"


def main() -> None:
    # One thread per measurement (inherited by every subprocess): on a shared machine,
    # multi-threaded kernels spin against other processes and the timings become noise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    quick = "--quick" in sys.argv
    rows = list(ROWS)
    if "--rows" in sys.argv:
        rows = sys.argv[sys.argv.index("--rows") + 1].split(",")
    functions = list(FUNCTIONS)
    if "--functions" in sys.argv:
        functions = sys.argv[sys.argv.index("--functions") + 1].split(",")
    warm = 1 if quick else 3
    lines = [
        "| row | function | ours first (s) | ours warm (s) | 0.0.1 first (s) | 0.0.1 warm (s) | speed-up (0.0.1 warm / ours warm) | ours peak extra mem (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for fn in functions:
        _, label, fn_rows, old_warm = FUNCTIONS[fn]
        for row in [r for r in fn_rows if r in rows]:
            ours = harness.run_case("bench_legacy", f"ours:{fn}:{row}", warm=warm)
            old = harness.run_case("bench_legacy", f"old:{fn}:{row}", warm=old_warm.get(row, warm), peer="torch_secorder_001",
                                   timeout=7200)
            lines.append(
                f"| {row} | {label} | {ours['first_s']:.3f} | {ours['warm_s']:.3f} | {old['first_s']:.2f} | "
                f"{old['warm_s']:.2f} | {harness.fmt_ratio(old['warm_s'], ours['warm_s'])} | {ours['peak_mib']:.1f} |"
            )
            print(lines[-1], flush=True)
            if fn.startswith("eig"):
                notes.append(
                    f"{label} on {row}: ours {_fmt(_values(f'ours:{fn}:{row}', False))}, "
                    f"0.0.1 {_fmt(_values(f'old:{fn}:{row}', True))}, "
                    f"float64 reference {_fmt(_values(f'ref:{fn}:{row}', False))}"
                )
                print(notes[-1], flush=True)
    print("\n" + "\n".join(lines))
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    elif "--values" in sys.argv:
        _values_main(sys.argv[sys.argv.index("--values") + 1])
    else:
        main()
