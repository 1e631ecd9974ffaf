"""GGN, Monte-Carlo Fisher and empirical Fisher: diagonals vs BackPACK, Hutchinson traces vs curvlinops.

Run: ``python -m benchmarks.bench_curvatures`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows, ``--part=diag|trace``). Each
(method, row) measurement runs in its own process (:mod:`benchmarks.harness`); the
rounds interleave the methods and each keeps its fastest round. float32 on the CPU,
one thread (``OMP_NUM_THREADS=1`` unless set), cross-entropy with mean reduction.

Diagonals: ours (``so.diagonal(f, curvature=...)``, ``engine="auto"``; the table
says which path ran) against BackPACK's ``DiagGGNExact``, ``DiagGGNMC`` (one
sample) and ``SumGradSquared`` (times ``N``: BackPACK squares the gradients of the
mean-reduced loss, ours is ``(1/N) sum_n g_n^2``), and against one gradient
evaluation. A curvature the structured engine does not take runs the generic
one-hot path, one matvec per parameter: on the 784-wide rows that is hours, so
such a measurement is skipped and the table says so.

Traces: Hutchinson with 60 probes of each curvature, ours (``so.trace(f,
curvature=..., method="hutchinson", num_samples=60)``) against curvlinops'
``HessianLinearOperator``/``GGNLinearOperator``/``FisherMCLinearOperator``/
``EFLinearOperator`` with its ``hutchinson_trace(op, 60)``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from benchmarks import harness
from benchmarks.bench_structured import ROWS as _STRUCTURED_ROWS
from benchmarks.bench_structured import workload

ROWS = {k: v for k, v in _STRUCTURED_ROWS.items() if not k.startswith("tanh 20-64-5")}
CURVATURES = ("ggn", "fisher", "empirical_fisher")
PROBES = 60
GENERIC_LIMIT = 2000  # parameters above which the generic one-hot diagonal is not measured (minutes per call)


def _loss_and_params(row):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    return model, so.params_dict(model), x, y, f


def _extra(curvature):
    return dict(mc_samples=1, seed=0) if curvature == "fisher" else {}


def _ours_diag(row, curvature):
    import secorder as so

    _, params, x, y, f = _loss_and_params(row)
    fn = so.diagonal(f, curvature=curvature, **_extra(curvature))
    return lambda: fn(params, x, y)


def _ours_trace(row, curvature):
    import secorder as so

    _, params, x, y, f = _loss_and_params(row)
    fn = so.trace(f, curvature=curvature, method="hutchinson", num_samples=PROBES, **_extra(curvature))
    return lambda: fn(params, x, y)


def _grad(row):
    _, params, x, y, f = _loss_and_params(row)
    g = torch.func.grad(f)
    return lambda: g(params, x, y)


def _backpack(row, curvature):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    model, x, y = workload(row)
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    ext, attr = {"ggn": (DiagGGNExact(), "diag_ggn_exact"), "fisher": (DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
                 "empirical_fisher": (SumGradSquared(), "sum_grad_squared")}[curvature]
    n = x.shape[0]

    def run():
        model.zero_grad()
        loss = lossfunc(model(x), y)
        with backpack(ext):
            loss.backward()
        out = [getattr(p, attr) for p in model.parameters()]
        return [n * d for d in out] if curvature == "empirical_fisher" else out

    return run


def _curvlinops(row, curvature):
    import curvlinops

    model, x, y = workload(row)
    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator,
           "fisher": curvlinops.FisherMCLinearOperator, "empirical_fisher": curvlinops.EFLinearOperator}[curvature]
    op = cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    return lambda: curvlinops.hutchinson_trace(op, PROBES)


CASES = {}
for _row in ROWS:
    CASES[f"grad:{_row}"] = (lambda r: lambda: _grad(r))(_row)
    for _c in CURVATURES:
        CASES[f"ours-diag-{_c}:{_row}"] = (lambda r, c: lambda: _ours_diag(r, c))(_row, _c)
        CASES[f"backpack-{_c}:{_row}"] = (lambda r, c: lambda: _backpack(r, c))(_row, _c)
    for _c in ("hessian",) + CURVATURES:
        CASES[f"ours-trace-{_c}:{_row}"] = (lambda r, c: lambda: _ours_trace(r, c))(_row, _c)
        CASES[f"curvlinops-{_c}:{_row}"] = (lambda r, c: lambda: _curvlinops(r, c))(_row, _c)

PEER_LABEL = {"ggn": "BackPACK `DiagGGNExact`", "fisher": "BackPACK `DiagGGNMC` (1 sample)",
              "empirical_fisher": "BackPACK `SumGradSquared` x N"}


def diagonal_path(row, curvature):
    """``"structured"`` or ``"generic"``: what ``engine="auto"`` runs for this row and curvature."""
    import secorder as so

    _, params, x, y, f = _loss_and_params(row)
    fn = so.diagonal(f, curvature=curvature, engine="structured", **_extra(curvature))
    try:
        fn(params, x[:2], y[:2])
    except so.structured.Unsupported:
        return "generic"
    return "structured"


def _best(case, repeat, warm, res):
    for _ in range(repeat):
        harness.keep_fastest(res, case, harness.run_case("bench_curvatures", case, warm=warm))
    return res[case]


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 2 if quick else 5
    repeat = harness.repeat_option(1 if quick else 2)
    rows = harness.selected_rows(ROWS)
    parts = [a.split("=")[1] for a in sys.argv if a.startswith("--part=")] or ["diag", "trace"]
    diag_lines = ["| row | curvature | ours (path) | ms | peer | ms | ours / peer | ours / gradient |",
                  "|---|---|---|---|---|---|---|---|"]
    trace_lines = [f"| row | curvature | ours: Hutchinson {PROBES} (ms) | curvlinops (ms) | ours / curvlinops |",
                   "|---|---|---|---|---|"]
    for row in rows:
        res = {}
        if "diag" in parts:
            grad_s = _best(f"grad:{row}", repeat, warm, res)["warm_s"]
            nparams = sum(p.numel() for p in workload(row)[0].parameters())
            for c in CURVATURES:
                path = diagonal_path(row, c)
                peer = _best(f"backpack-{c}:{row}", repeat, warm, res)["warm_s"]
                if path == "generic" and nparams > GENERIC_LIMIT:
                    diag_lines.append(f"| {row} | {c} | skipped: generic one-hot path, {nparams} matvecs | - | "
                                      f"{PEER_LABEL[c]} | {1e3 * peer:.1f} | - | - |")
                else:
                    ours = _best(f"ours-diag-{c}:{row}", repeat, warm, res)["warm_s"]
                    diag_lines.append(f"| {row} | {c} | {path} | {1e3 * ours:.1f} | {PEER_LABEL[c]} | "
                                      f"{1e3 * peer:.1f} | {harness.fmt_ratio(ours, peer)} | "
                                      f"{harness.fmt_ratio(ours, grad_s)} |")
                print(diag_lines[-1], flush=True)
            diag_lines.append(f"| {row} | one gradient | `torch.func.grad` | {1e3 * grad_s:.1f} | | | | 1.00x |")
        if "trace" in parts:
            for c in ("hessian",) + CURVATURES:
                ours = _best(f"ours-trace-{c}:{row}", repeat, warm, res)["warm_s"]
                peer = _best(f"curvlinops-{c}:{row}", repeat, warm, res)["warm_s"]
                trace_lines.append(f"| {row} | {c} | {1e3 * ours:.1f} | {1e3 * peer:.1f} | "
                                   f"{harness.fmt_ratio(ours, peer)} |")
                print(trace_lines[-1], flush=True)
    if "diag" in parts:
        print("\n" + "\n".join(diag_lines))
    if "trace" in parts:
        print("\n" + "\n".join(trace_lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
