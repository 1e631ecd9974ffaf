"""Real architectures: exact loss-factor diagonals, Hutchinson traces and top eigenvalues on Hugging Face models.

Two rows (issue 20), float32, CPU, one thread, every measurement in its own process
(:mod:`benchmarks.harness`), times as **gradient evaluations**: a case's warm time
divided by the warm time of one ``torch.func.grad`` of the same ``f`` in the same run.

* ``ResNet``: ``ResNetForImageClassification`` with hidden sizes (16, 32, 64, 128),
  depths (2, 2, 2, 2), 10 classes (703,386 parameters), ``eval()``, N=8 images of
  3x32x32. Ours: the exact GGN, empirical-Fisher and Monte-Carlo Fisher (one sample)
  diagonals (``so.diagonal(f, curvature=...)``: the structured engine declines the
  model, the per-sample loss-factor VJPs run, :mod:`secorder.operators.factor_diagonal`),
  also at ``chunk_size=8`` to show the memory bound, and the Hessian's Hutchinson trace
  per probe. Peers: curvlinops 3.0.1's ``hutchinson_trace`` on its
  ``HessianLinearOperator`` (curvlinops has no exact diagonal but one product per
  parameter: not run) and BackPACK's ``DiagGGNExact``/``SumGradSquared``/``DiagGGNMC``
  (which refuse this graph: the table shows their error).
* ``GPT-2``: ``GPT2LMHeadModel`` with 2 layers, width 64, 4 heads, vocabulary 1,000,
  N=4 sequences of T=32 tokens (random next tokens as targets, mean cross-entropy over
  every position). Ours: the Hessian's Hutchinson trace per probe and the top
  eigenvalue with ``so.eigenvalues(f, k=1, tol=1e-3)`` (Hessian products counted);
  curvlinops: ``hutchinson_trace`` and ``scipy.sparse.linalg.eigsh(k=1, tol=1e-3)`` on
  its operator (products counted), as a user calls them (PyTorch's fused attention:
  refused) and inside ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``; BackPACK as
  above (a run that fills only some parameters is reported as such).

The peers get the model wrapped to take a tensor and return the logits (curvlinops
3.0.1 also takes dict inputs; the wrapper keeps both peers on one code path).

Run: ``python -m benchmarks.bench_real_models`` (``--row=ResNet`` or ``--row=GPT-2``;
``--repeat=R`` rounds, interleaved, each case keeping its fastest; ``--quick``: 3 warm
calls, 2 rounds). The unit, one gradient, is measured first and last in every round
with 20 warm calls (the median of a call of tens of milliseconds is the noisiest
number on a shared machine), its fastest kept.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict

import torch
from torch import nn

from benchmarks import harness

ROWS = {
    "ResNet": "HF ResNet (16, 32, 64, 128) x (2, 2, 2, 2), 10 classes, N=8, 3x32x32",
    "GPT-2": "HF GPT-2 2 layers x 64, 4 heads, vocab 1000, N=4, T=32",
}
PROBES = 10
UNIT_WARM = 20  # warm calls of the unit (one gradient, tens of milliseconds)
_COUNT = [0]


class Logits(nn.Module):
    """A Hugging Face model as the peers take it: a tensor in, the logits out (``[N * T, V]`` for a LM)."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(**{self.key: x}).logits
        return logits.reshape(-1, logits.shape[-1]) if logits.dim() == 3 else logits


def workload(row: str) -> Dict[str, Any]:
    import transformers

    import secorder as so

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if row == "ResNet":
        model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
            layer_type="basic", num_labels=10)).eval()
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        return dict(model=model, f=f, inputs={"pixel_values": x}, x=x, y=y, peer_y=y, key="pixel_values")
    config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (4, 32), generator=g)
    y = torch.randint(0, 1000, (4, 32), generator=g)
    f = so.functional_loss(model, nn.CrossEntropyLoss(), output=lambda out: out.logits.transpose(1, 2))
    return dict(model=model, f=f, inputs={"input_ids": ids}, x=ids, y=y, peer_y=y.reshape(-1), key="input_ids")


# -- ours ------------------------------------------------------------------------------------------------


def _grad(row: str) -> Callable[[], Any]:
    import secorder as so

    w = workload(row)
    g = torch.func.grad(w["f"])
    params = so.params_dict(w["model"])
    return lambda: {"value": float(sum(v.sum() for v in g(params, w["inputs"], w["y"]).values()))}


def _diag(row: str, curvature: str, chunk_size=None) -> Callable[[], Any]:
    import secorder as so

    w = workload(row)
    params = so.params_dict(w["model"])
    seed = {"seed": 0} if curvature == "fisher" else {}
    fn = so.diagonal(w["f"], curvature=curvature, chunk_size=chunk_size, **seed)

    def run():
        d = fn(params, w["inputs"], w["y"])
        return {"route": (fn.last_fallback_reason or "").split("exact diagonal: ")[-1].split(" (")[0],
                "sum": float(sum(v.sum() for v in d.values()))}

    return run


def _hutchinson(row: str) -> Callable[[], Any]:
    import secorder as so

    w = workload(row)
    params = so.params_dict(w["model"])
    fn = so.trace(w["f"], method="hutchinson", num_samples=PROBES, seed=0)
    return lambda: {"value": float(fn(params, w["inputs"], w["y"])), "matvecs": PROBES}


def _count_ours() -> None:
    from secorder.estimators import lanczos

    call = lanczos.FlatOperator.__call__

    def counted(self, X):
        _COUNT[0] += X.shape[0]
        return call(self, X)

    lanczos.FlatOperator.__call__ = counted


def _top(row: str) -> Callable[[], Any]:
    import secorder as so

    _count_ours()
    w = workload(row)
    params = so.params_dict(w["model"])
    fn = so.eigenvalues(w["f"], k=1, tol=1e-3, seed=0)
    return lambda: {"value": float(fn(params, w["inputs"], w["y"])[0])}


# -- peers -----------------------------------------------------------------------------------------------


def _curvlinops_operator(row: str):
    import curvlinops

    w = workload(row)
    model = Logits(w["model"], w["key"])
    op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), [p for p in model.parameters()],
                                          [(w["x"], w["peer_y"])], check_deterministic=False)
    matmat = op._matmat

    def counted(X):
        _COUNT[0] += X[0].shape[-1]
        return matmat(X)

    op._matmat = counted
    return op


def _math_kernel(math: bool):
    """PyTorch's math attention kernel for the whole call (the user's switch; curvlinops needs it for GPT-2)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()


def _curvlinops_hutchinson(row: str, math: bool = False) -> Callable[[], Any]:
    import curvlinops

    op = _curvlinops_operator(row)

    def run():
        with _math_kernel(math):
            return {"value": float(curvlinops.hutchinson_trace(op, PROBES)), "matvecs": PROBES}

    return run


def _curvlinops_top(row: str, math: bool = False) -> Callable[[], Any]:
    from scipy.sparse.linalg import eigsh

    op = _curvlinops_operator(row)

    def run():
        with _math_kernel(math):
            return {"value": float(eigsh(op.to_scipy(), k=1, which="LA", tol=1e-3, return_eigenvectors=False)[0])}

    return run


def _backpack(row: str, curvature: str) -> Callable[[], Any]:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    w = workload(row)
    model = extend(Logits(w["model"], w["key"]))
    loss_fn = extend(nn.CrossEntropyLoss())
    ext = {"ggn": DiagGGNExact(), "fisher": DiagGGNMC(mc_samples=1), "empirical_fisher": SumGradSquared()}[curvature]

    attr = {"ggn": "diag_ggn_exact", "fisher": "diag_ggn_mc", "empirical_fisher": "sum_grad_squared"}[curvature]

    def run():
        model.zero_grad()
        with backpack(ext):
            loss_fn(model(w["x"]), w["peer_y"]).backward()
        params = list(model.parameters())
        return {"filled": sum(hasattr(p, attr) for p in params), "of": len(params)}

    return run


CASES: Dict[str, Callable[[], Callable[[], Any]]] = {}
for _row in ROWS:
    CASES[f"grad:{_row}"] = (lambda r: lambda: _grad(r))(_row)
    CASES[f"ours-hutchinson:{_row}"] = (lambda r: lambda: _hutchinson(r))(_row)
    CASES[f"curvlinops-hutchinson:{_row}"] = (lambda r: lambda: _curvlinops_hutchinson(r))(_row)
    for _c in ("ggn", "empirical_fisher", "fisher"):
        CASES[f"backpack-{_c}:{_row}"] = (lambda r, c: lambda: _backpack(r, c))(_row, _c)
for _c in ("ggn", "empirical_fisher", "fisher"):
    CASES[f"ours-diag-{_c}:ResNet"] = (lambda c: lambda: _diag("ResNet", c))(_c)
CASES["ours-diag-ggn-chunk8:ResNet"] = lambda: _diag("ResNet", "ggn", 8)
CASES["ours-top:GPT-2"] = lambda: _top("GPT-2")
CASES["curvlinops-top:GPT-2"] = lambda: _curvlinops_top("GPT-2")
CASES["curvlinops-math-hutchinson:GPT-2"] = lambda: _curvlinops_hutchinson("GPT-2", math=True)
CASES["curvlinops-math-top:GPT-2"] = lambda: _curvlinops_top("GPT-2", math=True)

LABELS = {
    "grad": "one gradient, `torch.func.grad(f)` (the unit)",
    "ours-diag-ggn": "secorder exact GGN diagonal (loss-factor VJPs, 10 columns)",
    "ours-diag-ggn-chunk8": "secorder exact GGN diagonal, `chunk_size=8`",
    "ours-diag-empirical_fisher": "secorder exact empirical-Fisher diagonal",
    "ours-diag-fisher": "secorder exact MC-Fisher diagonal (1 sample)",
    "ours-hutchinson": f"secorder Hessian Hutchinson trace, per probe ({PROBES} probes)",
    "curvlinops-hutchinson": f"curvlinops `hutchinson_trace` (Hessian), per probe ({PROBES} probes)",
    "curvlinops-math-hutchinson":
        f"curvlinops `hutchinson_trace` inside `sdpa_kernel(MATH)`, per probe ({PROBES} probes)",
    "ours-top": "secorder `so.eigenvalues(k=1, tol=1e-3)`",
    "curvlinops-top": "curvlinops + `eigsh(k=1, tol=1e-3)`",
    "curvlinops-math-top": "curvlinops + `eigsh(k=1, tol=1e-3)` inside `sdpa_kernel(MATH)`",
    "backpack-ggn": "BackPACK `DiagGGNExact`",
    "backpack-empirical_fisher": "BackPACK `SumGradSquared`",
    "backpack-fisher": "BackPACK `DiagGGNMC` (1 sample)",
}


def worker() -> None:
    """Subprocess entry: time one case, report its result and counted products."""
    args = sys.argv[1:]
    name = args[args.index("--worker") + 1]
    warm = int(args[args.index("--warm") + 1]) if "--warm" in args else 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: Dict[str, Any] = {}
    try:
        fn = CASES[name]()

        def timed():
            _COUNT[0] = 0
            out.update(fn() or {})
            out.setdefault("matvecs", _COUNT[0])

        result = harness.measure(timed, warm=warm)
    except Exception as err:  # a peer that refuses the model: its error is the table's entry
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    result.update(out)
    print("RESULT " + json.dumps(result))


def _methods(row: str):
    return [m for m in LABELS if f"{m}:{row}" in CASES]


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 3 if quick else 5
    repeat = harness.repeat_option(2 if quick else 3)
    lines = ["| row | method | warm (s) | gradient evaluations | products | peak extra RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    routes = set()
    for row in harness.selected_rows(ROWS):
        res: Dict[str, Dict[str, Any]] = {}
        for _ in range(repeat):
            # the unit is short and so the noisiest: more warm calls, and measured first and last in each round
            for m in _methods(row) + ["grad"]:
                r = harness.run_case("bench_real_models", f"{m}:{row}", warm=UNIT_WARM if m == "grad" else warm)
                if "error" in r:
                    res[m] = r
                else:
                    harness.keep_fastest(res, m, r)
        unit = res["grad"]["warm_s"]
        for m in _methods(row):
            r = res[m]
            if "error" in r:
                lines.append(f"| {ROWS[row]} | {LABELS[m]} | refuses: {r['error']} | | | |")
                continue
            t = r["warm_s"]
            per = PROBES if m.endswith("hutchinson") else 1
            if "of" in r and r["filled"] < r["of"]:
                lines.append(f"| {ROWS[row]} | {LABELS[m]} | runs, but fills {r['filled']} of {r['of']} parameters "
                             "(no extension for the others) | | | |")
                continue
            if r.get("route"):
                routes.add(r["route"])
            lines.append(f"| {ROWS[row]} | {LABELS[m]} | {t:.3f} | {t / per / unit:.2f} | "
                         f"{r.get('matvecs') or ''} | {r['peak_mib']:.1f} |")
        print("\n".join(lines), flush=True)
    print("\n" + "\n".join(lines))
    print("\nroutes of the exact diagonals: " + "; ".join(sorted(routes)))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
