"""The structured engine inside torch.func: per-example diagonals (vmap) and a curvature-penalised step (grad).

Run: ``python -m benchmarks.bench_compose`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows). Each (method, row)
measurement runs in its own process (:mod:`benchmarks.harness`); rounds
interleave the methods and each keeps its fastest round. float32, CPU, one
thread, cross-entropy with mean reduction.

* Per-example exact GGN and Hessian diagonals,
  ``vmap(so.ggn_diag(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])``
  (and ``so.hessian_diag``), against BackPACK's ``BatchDiagGGNExact`` /
  ``BatchDiagHessian`` on the same batch, and against a Python loop of the
  unbatched structured call.
* A trace-regularised training step,
  ``torch.func.grad(lambda p: f(p, x, y) + 0.1 * so.trace(f)(p, x, y))(params)``,
  against one plain gradient ``torch.func.grad(f)`` and against the same
  expression through ``torch.autograd.grad``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from benchmarks import harness

ROWS = {
    "tanh 784-32-10 N=32": dict(sizes=(784, 32, 10), act=nn.Tanh, n=32),
    "relu 784-256-256-10 N=64": dict(sizes=(784, 256, 256, 10), act=nn.ReLU, n=64),
}


def workload(row):
    spec = ROWS[row]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers = []
    sizes = spec["sizes"]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(spec["act"]())
    model = nn.Sequential(*layers).eval()
    x = torch.randn(spec["n"], sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (spec["n"],), generator=g)
    return model, x, y


def _structured(fn, *args):
    """Call once and insist that the structured engine ran (the measurement is of that path)."""
    fn(*args)
    if getattr(fn, "last_engine", "structured") != "structured":
        raise RuntimeError(f"the structured engine did not run: {fn.last_fallback_reason}")


def _per_example(row, what):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    make = so.ggn_diag if what == "ggn" else so.hessian_diag
    fn = make(f)
    batched = torch.func.vmap(fn, in_dims=(None, 0, 0))
    xs, ys = x.unsqueeze(1), y.unsqueeze(1)
    _structured(lambda *a: batched(*a), params, xs, ys)
    if fn.last_engine != "structured":
        raise RuntimeError(f"the structured engine did not run under vmap: {fn.last_fallback_reason}")
    return lambda: batched(params, xs, ys)


def _loop(row):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    fn = so.ggn_diag(f)
    _structured(fn, params, x[:1], y[:1])

    def run():
        return [fn(params, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]

    return run


def _backpack(row, what):
    from backpack import backpack, extend
    from backpack.extensions import BatchDiagGGNExact, BatchDiagHessian

    model, x, y = workload(row)
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    ext = BatchDiagGGNExact() if what == "ggn" else BatchDiagHessian()
    attr = "diag_ggn_exact_batch" if what == "ggn" else "diag_h_batch"

    def run():
        model.zero_grad()
        loss = lossfunc(model(x), y)
        with backpack(ext):
            loss.backward()
        return [getattr(p, attr) for p in model.parameters()]

    return run


def _penalty(row, route):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    trace = so.trace(f)
    if route == "func":
        step = torch.func.grad(lambda p: f(p, x, y) + 0.1 * trace(p, x, y))
        _structured(lambda: step(params))
        if trace.last_engine != "structured":
            raise RuntimeError(f"the structured engine did not run under grad: {trace.last_fallback_reason}")
        return lambda: step(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def run():
        return torch.autograd.grad(f(leaves, x, y) + 0.1 * trace(leaves, x, y), list(leaves.values()))

    return run


def _grad(row):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    g = torch.func.grad(f)
    return lambda: g(params, x, y)


CASES = {}
for _row in ROWS:
    for _what in ("ggn", "hessian"):
        CASES[f"ours-pe-{_what}:{_row}"] = (lambda r, w: lambda: _per_example(r, w))(_row, _what)
        CASES[f"backpack-pe-{_what}:{_row}"] = (lambda r, w: lambda: _backpack(r, w))(_row, _what)
    CASES[f"loop-pe-ggn:{_row}"] = (lambda r: lambda: _loop(r))(_row)
    CASES[f"penalty-func:{_row}"] = (lambda r: lambda: _penalty(r, "func"))(_row)
    CASES[f"penalty-autograd:{_row}"] = (lambda r: lambda: _penalty(r, "autograd"))(_row)
    CASES[f"grad:{_row}"] = (lambda r: lambda: _grad(r))(_row)

LABELS = {
    "backpack-pe-ggn": "BackPACK `BatchDiagGGNExact`",
    "ours-pe-ggn": "`vmap(so.ggn_diag(f))` per example",
    "loop-pe-ggn": "loop of `so.ggn_diag(f)` over examples",
    "backpack-pe-hessian": "BackPACK `BatchDiagHessian`",
    "ours-pe-hessian": "`vmap(so.hessian_diag(f))` per example",
    "grad": "one gradient (`torch.func.grad(f)`)",
    "penalty-func": "`torch.func.grad` of loss + 0.1 x `so.trace(f)`",
    "penalty-autograd": "`torch.autograd.grad` of loss + 0.1 x `so.trace(f)`",
}
BASELINE = {"backpack-pe-ggn": "backpack-pe-ggn", "ours-pe-ggn": "backpack-pe-ggn", "loop-pe-ggn": "backpack-pe-ggn",
            "backpack-pe-hessian": "backpack-pe-hessian", "ours-pe-hessian": "backpack-pe-hessian",
            "grad": "grad", "penalty-func": "grad", "penalty-autograd": "grad"}
METHODS = ["backpack-pe-ggn", "ours-pe-ggn", "loop-pe-ggn", "backpack-pe-hessian", "ours-pe-hessian",
           "grad", "penalty-func", "penalty-autograd"]


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 3 if quick else 10
    repeat = harness.repeat_option(1 if quick else 3)
    rows = harness.selected_rows(ROWS)
    lines = [
        "| row | method | warm (ms) | peak extra mem (MiB) | ratio | to |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        res = {}
        for _ in range(repeat):
            for m in METHODS:
                r = harness.run_case("bench_compose", f"{m}:{row}", warm=warm)
                harness.keep_fastest(res, m, r)
        for m in METHODS:
            r, b = res[m], res[BASELINE[m]]
            lines.append(
                f"| {row} | {LABELS[m]} | {1e3 * r['warm_s']:.2f} | {r['peak_mib']:.1f} | "
                f"{harness.fmt_ratio(r['warm_s'], b['warm_s'])} | {LABELS[BASELINE[m]].split(' (')[0]} |"
            )
        print("\n".join(lines[-len(METHODS):]), flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
