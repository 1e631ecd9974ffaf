"""Legacy API: our ``torch_secorder`` against torch-secorder 0.0.1, exact Hessian trace.

Run: ``python -m benchmarks.bench_legacy`` (``--quick`` for fewer warm calls,
``--rows mlp20`` to restrict the rows). Rows are the MLP 20-64-5 and 784-32-10
cross-entropy workloads of :mod:`benchmarks.workloads`. Two functions:

* ``torch_secorder.core.hessian_trace.hessian_trace`` on a closure (the generic
  path: it cannot see the model),
* ``model_hessian_trace`` (ours uses the structured engine where the model
  qualifies, as these do).

Every (function, implementation, row) runs in its own process; the old package
runs with its isolated install first on ``PYTHONPATH`` and each worker asserts
which ``torch_secorder`` it imported. The old package spends one double
backward per parameter entry, so on the large row it gets a single timed call
(its "warm" column is then that call).
"""

from __future__ import annotations

import sys
from pathlib import Path

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
    from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace

    return hessian_trace, model_hessian_trace


def _closure_case(row: str, peer: bool):
    hessian_trace, _ = _import(peer)
    model, x, y = classification(**ROWS[row])
    params = list(model.parameters())
    return lambda: hessian_trace(lambda: F.cross_entropy(model(x), y), params)


def _model_case(row: str, peer: bool):
    _, model_hessian_trace = _import(peer)
    model, x, y = classification(**ROWS[row])
    return lambda: model_hessian_trace(model, F.cross_entropy, x, y)


FUNCTIONS = {"closure": _closure_case, "model": _model_case}
LABELS = {
    "closure": "`core.hessian_trace.hessian_trace` (closure)",
    "model": "`core.hessian_trace.model_hessian_trace`",
}

CASES = {}
for _row in ROWS:
    for _fn, _make in FUNCTIONS.items():
        CASES[f"ours:{_fn}:{_row}"] = (lambda m, r: lambda: m(r, False))(_make, _row)
        CASES[f"old:{_fn}:{_row}"] = (lambda m, r: lambda: m(r, True))(_make, _row)


def main() -> None:
    quick = "--quick" in sys.argv
    rows = list(ROWS)
    if "--rows" in sys.argv:
        rows = sys.argv[sys.argv.index("--rows") + 1].split(",")
    warm = 1 if quick else 3
    lines = [
        "| row | function | ours first (s) | ours warm (s) | 0.0.1 first (s) | 0.0.1 warm (s) | speed-up (0.0.1 warm / ours warm) | ours peak extra mem (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for fn in FUNCTIONS:
            ours = harness.run_case("bench_legacy", f"ours:{fn}:{row}", warm=warm)
            old_warm = 0 if row == "mlp784" else 1
            old = harness.run_case("bench_legacy", f"old:{fn}:{row}", warm=old_warm, peer="torch_secorder_001",
                                   timeout=7200)
            lines.append(
                f"| {row} | {LABELS[fn]} | {ours['first_s']:.3f} | {ours['warm_s']:.3f} | {old['first_s']:.2f} | "
                f"{old['warm_s']:.2f} | {harness.fmt_ratio(old['warm_s'], ours['warm_s'])} | {ours['peak_mib']:.1f} |"
            )
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
