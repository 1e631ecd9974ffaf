"""Exact Hessian trace, generic path: secorder vs torch.func.hessian vs torch-secorder 0.0.1.

Run: ``python -m benchmarks.bench_exact_trace`` (add ``--quick`` for fewer warm calls).
Each (method, row) pair runs in its own process; the table reports ratios of
the peers' times and peak memory to ours, measured in the same run.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.workloads import ROWS, classification


def _ours(row, engine="generic"):
    import secorder as so

    model, x, y = classification(**ROWS[row])
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    tr = so.trace(f, engine=engine)
    return lambda: tr(params, x, y)


def _func_hessian(row):
    import secorder as so

    model, x, y = classification(**ROWS[row])
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    flat, unravel = so.tree.ravel(params)
    h = torch.func.hessian(lambda u: f(unravel(u), x, y))
    return lambda: torch.diagonal(h(flat)).sum()


def _old_closure(row):
    import torch_secorder
    from torch_secorder.core.hessian_trace import hessian_trace

    assert "bench_peers" in torch_secorder.__file__, torch_secorder.__file__
    model, x, y = classification(**ROWS[row])
    params = list(model.parameters())
    return lambda: hessian_trace(lambda: F.cross_entropy(model(x), y), params)


CASES = {}
for _row in ROWS:
    CASES[f"ours:{_row}"] = (lambda r: lambda: _ours(r))(_row)
    CASES[f"structured:{_row}"] = (lambda r: lambda: _ours(r, "structured"))(_row)
    CASES[f"func_hessian:{_row}"] = (lambda r: lambda: _func_hessian(r))(_row)
    CASES[f"old:{_row}"] = (lambda r: lambda: _old_closure(r))(_row)


def main() -> None:
    quick = "--quick" in sys.argv
    warm = 1 if quick else 3
    lines = [
        "| row | method | first call (s) | warm (s) | peak extra mem (MiB) | time vs ours (warm) | mem vs ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        ours = harness.run_case("bench_exact_trace", f"ours:{row}", warm=warm)
        results = [("secorder `so.trace(engine=\"generic\")`", ours)]
        if row == "mlp20":  # dense Hessian needs n^2 memory: small row only
            results.append(("`torch.func.hessian` + diag sum",
                            harness.run_case("bench_exact_trace", f"func_hessian:{row}", warm=warm)))
        results.append(("torch-secorder 0.0.1 `hessian_trace`",
                        harness.run_case("bench_exact_trace", f"old:{row}", warm=max(1, warm - 2),
                                         peer="torch_secorder_001")))
        results.append(("secorder `so.trace` (structured engine, for reference)",
                        harness.run_case("bench_exact_trace", f"structured:{row}", warm=warm)))
        for name, r in results:
            lines.append(
                f"| {row} | {name} | {r['first_s']:.3f} | {r['warm_s']:.3f} | {r['peak_mib']:.1f} | "
                f"{harness.fmt_ratio(r['warm_s'], ours['warm_s'])} | "
                f"{harness.fmt_ratio(r['peak_mib'], max(ours['peak_mib'], 1e-9))} |"
            )
        print("\n".join(lines[-len(results):]), flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
