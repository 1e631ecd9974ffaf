"""What the routes around PyTorch's wrong rules cost (issue 25): the composite mode, reverse mode, keyed labels.

Run: ``python -m benchmarks.bench_safety`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows). Each (method, row)
measurement runs in its own process (:mod:`benchmarks.harness`); rounds
interleave the methods and each keeps its fastest round. float32, CPU, one
thread.

* ``so.hvp`` on an MLP, whose every evaluation runs under
  :func:`secorder.differentiable_ops` (a ``TorchFunctionMode`` that looks every
  torch call up in the composite and forward-mode tables), against the bare
  ``torch.func.jvp(torch.func.grad(f))``: the mode's overhead.
* ``so.hvp`` on a cosine-similarity classifier (``F.normalize``, whose
  forward-mode rule cannot be differentiated again, so ``so.hvp`` takes
  reverse-over-reverse), against the bare forward-over-reverse product (right
  here, as long as nobody differentiates it): the cost of the safe route.
* A Hutchinson trace of the Monte-Carlo Fisher of a data-set loss (labels keyed
  by each sample's content, :mod:`secorder.sample_keys`) against the same
  estimate of the GGN, which draws no labels: the cost of the keys.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

ROWS = {
    "tanh 784-256-10 N=64": dict(n=64),
}


class _Cosine(nn.Module):
    """A cosine-similarity classifier head: normalised features against normalised class vectors."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 256), nn.Tanh())
        self.classes = nn.Parameter(torch.randn(10, 256))

    def forward(self, x):
        return 10.0 * F.normalize(self.body(x), dim=1) @ F.normalize(self.classes, dim=1).T


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cosine":
        return _Cosine().eval()
    return nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10)).eval()


def _data(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hvp(row: str, kind: str, route: str):
    import secorder as so

    model = _model(kind)
    x, y = _data(ROWS[row]["n"])
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    if route == "ours":
        hvp = so.hvp(f)
        return lambda: hvp(params, x, y, v)
    g = torch.func.grad(f)
    return lambda: torch.func.jvp(lambda p: g(p, x, y), (params,), (v,))[1]


def _fisher(row: str, curvature: str):
    import secorder as so

    model = _model("mlp")
    x, y = _data(8 * ROWS[row]["n"])
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, x.shape[0], 64)]
    F_ = so.dataset_loss(f, data)
    params = so.params_dict(model)
    est = so.trace_estimate(F_, curvature=curvature, num_samples=8, seed=0)
    return lambda: est(params)


CASES = {}
for _row in ROWS:
    for _kind in ("mlp", "cosine"):
        for _route in ("ours", "bare"):
            CASES[f"hvp-{_kind}-{_route}:{_row}"] = (lambda r, k, t: lambda: _hvp(r, k, t))(_row, _kind, _route)
    for _curv in ("fisher", "ggn"):
        CASES[f"trace-{_curv}:{_row}"] = (lambda r, c: lambda: _fisher(r, c))(_row, _curv)

LABELS = {
    "hvp-mlp-bare": "MLP: `jvp(grad(f))` (bare)",
    "hvp-mlp-ours": "MLP: `so.hvp(f)` (composite mode)",
    "hvp-cosine-bare": "cosine head: `jvp(grad(f))` (bare forward-over-reverse)",
    "hvp-cosine-ours": "cosine head: `so.hvp(f)` (reverse-over-reverse)",
    "trace-ggn": "data set, 8 batches: Hutchinson GGN trace, 8 probes",
    "trace-fisher": "data set, 8 batches: Hutchinson MC Fisher trace, 8 probes (keyed labels)",
}
BASELINE = {"hvp-mlp-bare": "hvp-mlp-bare", "hvp-mlp-ours": "hvp-mlp-bare", "hvp-cosine-bare": "hvp-cosine-bare",
            "hvp-cosine-ours": "hvp-cosine-bare", "trace-ggn": "trace-ggn", "trace-fisher": "trace-ggn"}
METHODS = list(LABELS)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 3 if quick else 10
    repeat = harness.repeat_option(1 if quick else 3)
    lines = ["| row | method | warm (ms) | peak extra mem (MiB) | ratio | to |", "|---|---|---|---|---|---|"]
    for row in harness.selected_rows(ROWS):
        res = {}
        for _ in range(repeat):
            for m in METHODS:
                harness.keep_fastest(res, m, harness.run_case("bench_safety", f"{m}:{row}", warm=warm))
        for m in METHODS:
            r, b = res[m], res[BASELINE[m]]
            lines.append(f"| {row} | {LABELS[m]} | {1e3 * r['warm_s']:.2f} | {r['peak_mib']:.1f} | "
                         f"{harness.fmt_ratio(r['warm_s'], b['warm_s'])} | {LABELS[BASELINE[m]].split(':')[0]} |")
    print("\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
