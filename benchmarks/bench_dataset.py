"""Curvature of a whole data set (``so.dataset_loss``) against curvlinops, PyHessian and BackPACK; 2 processes vs 1.

Run: ``python -m benchmarks.bench_dataset`` (``--quick``: one round and at most 3
warm calls, about 9 minutes on 2 loaded cores; ``--repeat=R`` rounds). Workload
(issue 13): float32 on the CPU, an MLP 784-256-256-10 with tanh, cross-entropy
(mean), 20 batches of 128 synthetic samples, one thread per process
(``OMP_NUM_THREADS=1`` unless set). Each measurement runs in its own process
(:mod:`benchmarks.harness`); the rounds interleave the methods and each method
keeps its fastest round (the sub-second calls take at least ``CHEAP_ROUNDS``
rounds).

* Hutchinson trace of the Hessian over the data set, 60 Rademacher probes:
  secorder ``so.trace_estimate(F, method="hutchinson")`` (every batch visited once
  by the block of 60 probes) against curvlinops (``HessianLinearOperator`` on the
  list of batches, ``hutchinson_trace(H, 60)``) and PyHessian
  (``hessian(model, loss, dataloader=batches).trace(maxIter=60)``, its tolerance
  set so that it takes all 60 probes). PyHessian visits every batch once per
  probe (a forward, a backward with ``create_graph`` and a double backward each);
  curvlinops 3.0.1 already ``vmap``-s its Hessian-vector product over the columns
  of a matrix product, so it too visits every batch once per block of probes.
* Exact Hessian and GGN diagonal over the data set: secorder's structured engine
  on ``F`` (one pass) against BackPACK's ``DiagHessian`` / ``DiagGGNExact`` on every
  batch, accumulated with the batch weights.
* The exact Hessian diagonal on 2 gloo processes (10 batches each, one thread
  each) against 1 process with all 20 batches: the timed call is rank 0's, which
  ends with the all-reduce, so it includes waiting for rank 1.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
from torch import nn

from benchmarks import harness
from benchmarks.workloads import mlp

SIZES = (784, 256, 256, 10)
NUM_BATCHES, BATCH = 20, 128
NUM_PROBES = 60


def workload():
    """The model (eval mode) and the list of ``NUM_BATCHES`` batches ``(x, y)``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = mlp(SIZES, nn.Tanh).eval()
    batches = [(torch.randn(BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (BATCH,), generator=g))
               for _ in range(NUM_BATCHES)]
    return model, batches


def _ours(what, batches=None, process_group=None):
    import secorder as so

    model, all_batches = workload()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    F = so.dataset_loss(f, all_batches if batches is None else batches, process_group=process_group)
    params = so.params_dict(model)
    fn = {
        "hutchinson": so.trace_estimate(F, method="hutchinson", num_samples=NUM_PROBES, seed=0),
        "diag": so.hessian_diag(F, engine="structured"),
        "ggn": so.ggn_diag(F, engine="structured"),
    }[what]
    return lambda: fn(params)


def _curvlinops():
    from curvlinops import HessianLinearOperator, hutchinson_trace

    model, batches = workload()
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), [p for p in model.parameters() if p.requires_grad],
                              batches, check_deterministic=False)
    return lambda: hutchinson_trace(H, NUM_PROBES)


def _pyhessian():
    from pyhessian import hessian

    model, batches = workload()
    h = hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    return lambda: h.trace(maxIter=NUM_PROBES, tol=float("-inf"))  # never stops early: all 60 probes


def _backpack(what):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    model, batches = workload()
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    ext, attr = (DiagHessian(), "diag_h") if what == "diag" else (DiagGGNExact(), "diag_ggn_exact")
    total = sum(y.shape[0] for _, y in batches)

    def run():
        acc = None
        for x, y in batches:
            model.zero_grad()
            loss = lossfunc(model(x), y)
            with backpack(ext):
                loss.backward()
            w = y.shape[0] / total
            parts = [getattr(p, attr) * w for p in model.parameters()]
            acc = parts if acc is None else [a + b for a, b in zip(acc, parts)]
        return acc

    return run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank1(port, calls):
    """Rank 1 of the 2-process case: the second half of the batches, as many calls as rank 0 makes."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2,
                                         timeout=datetime.timedelta(seconds=600))
    _, batches = workload()
    fn = _ours("diag", batches[NUM_BATCHES // 2:], torch.distributed.group.WORLD)
    for _ in range(calls):
        fn()
    torch.distributed.destroy_process_group()


def _two_processes():
    """Rank 0 (this process) and rank 1 (a fresh interpreter, as torchrun starts it); every call of the returned
    function is one call on each rank."""
    import subprocess

    torch.set_num_threads(1)
    warm = int(sys.argv[sys.argv.index("--warm") + 1]) if "--warm" in sys.argv else 5
    port = _free_port()
    subprocess.Popen([sys.executable, "-m", "benchmarks.bench_dataset", "--rank1", str(port), str(1 + warm)],
                     cwd=str(harness.REPO))
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                         timeout=datetime.timedelta(seconds=600))
    _, batches = workload()
    return _ours("diag", batches[: NUM_BATCHES // 2], torch.distributed.group.WORLD)


CASES = {
    "ours-hutchinson": lambda: _ours("hutchinson"),
    "curvlinops-hutchinson": _curvlinops,
    "pyhessian-hutchinson": _pyhessian,
    "ours-diag": lambda: _ours("diag"),
    "backpack-diag": lambda: _backpack("diag"),
    "ours-ggn": lambda: _ours("ggn"),
    "backpack-ggn": lambda: _backpack("ggn"),
    "ours-diag-2proc": _two_processes,
}

LABELS = {
    "ours-hutchinson": "secorder `trace_estimate(F, method='hutchinson')`",
    "curvlinops-hutchinson": "curvlinops `HessianLinearOperator` + `hutchinson_trace`",
    "pyhessian-hutchinson": "PyHessian `hessian(dataloader=...).trace()`",
    "ours-diag": "secorder `hessian_diag(F)` (structured), 1 process",
    "backpack-diag": "BackPACK `DiagHessian` per batch, accumulated",
    "ours-ggn": "secorder `ggn_diag(F)` (structured)",
    "backpack-ggn": "BackPACK `DiagGGNExact` per batch, accumulated",
    "ours-diag-2proc": "secorder `hessian_diag(F)` (structured), 2 gloo processes",
}
#: (quantity, the method the row is compared with); ratios are the row's time over ours (above 1x: we are faster)
GROUPS = [
    ("Hutchinson trace, 60 probes", "ours-hutchinson", ["ours-hutchinson", "curvlinops-hutchinson",
                                                        "pyhessian-hutchinson"]),
    ("exact Hessian diagonal", "ours-diag", ["ours-diag", "backpack-diag", "ours-diag-2proc"]),
    ("exact GGN diagonal", "ours-ggn", ["ours-ggn", "backpack-ggn"]),
]
#: warm calls per method (the peers' minute-long calls: one); ``--quick`` caps the others at 3
WARM = {"curvlinops-hutchinson": 1, "pyhessian-hutchinson": 1, "ours-hutchinson": 2, "backpack-diag": 1}
#: rounds of the sub-second calls (the 2-process comparison is the noisiest on a shared machine)
CHEAP_ROUNDS = 5


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    repeat = harness.repeat_option(1 if quick else 2)
    methods = [m for _, _, ms in GROUPS for m in ms]
    res = {}
    for i in range(max(repeat, CHEAP_ROUNDS)):
        for m in methods:
            if i >= repeat and m in WARM:  # the minute-long calls: `repeat` rounds; the others more
                continue
            warm = min(WARM.get(m, 5), 3) if quick else WARM.get(m, 5)
            r = harness.run_case("bench_dataset", m, warm=warm)
            print(f"{m}: warm {r['warm_s']:.3f} s, first {r['first_s']:.3f} s, peak {r['peak_mib']:.1f} MiB",
                  flush=True)
            harness.keep_fastest(res, m, r)
    lines = [f"MLP {'-'.join(map(str, SIZES))} tanh, {NUM_BATCHES} batches of {BATCH}, float32, CPU, "
             f"one thread per process",
             "",
             "| quantity | method | warm (s) | peak extra mem (MiB) | time vs secorder (1 process) |",
             "|---|---|---|---|---|"]
    for quantity, ref, ms in GROUPS:
        for m in ms:
            r = res[m]
            lines.append(f"| {quantity} | {LABELS[m]} | {r['warm_s']:.3f} | {r['peak_mib']:.1f} | "
                         f"{harness.fmt_ratio(r['warm_s'], res[ref]['warm_s'])} |")
    speedup = res["ours-diag"]["warm_s"] / res["ours-diag-2proc"]["warm_s"]
    lines += ["", "Targets (issue 13):",
              f"- Hutchinson trace vs curvlinops: {harness.fmt_ratio(res['curvlinops-hutchinson']['warm_s'], res['ours-hutchinson']['warm_s'])} faster (target >= 3x)",
              f"- Hutchinson trace vs PyHessian: {harness.fmt_ratio(res['pyhessian-hutchinson']['warm_s'], res['ours-hutchinson']['warm_s'])} faster (target >= 3x)",
              f"- exact Hessian diagonal vs BackPACK: {harness.fmt_ratio(res['ours-diag']['warm_s'], res['backpack-diag']['warm_s'])} of its time (target <= 1.0x)",
              f"- exact GGN diagonal vs BackPACK: {harness.fmt_ratio(res['ours-ggn']['warm_s'], res['backpack-ggn']['warm_s'])} of its time (target <= 1.0x)",
              f"- 2 processes vs 1 on the exact Hessian diagonal: speed-up {speedup:.2f}x (target >= 1.6x)"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--rank1" in sys.argv:
        _rank1(int(sys.argv[sys.argv.index("--rank1") + 1]), int(sys.argv[sys.argv.index("--rank1") + 2]))
    elif "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
