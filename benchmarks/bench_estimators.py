"""Stochastic trace estimators: accuracy per matvec and time per matvec, secorder vs curvlinops.

Run: ``python -m benchmarks.bench_estimators`` (``--quick``: 4 seeds, for a smoke run).

Three operators: the Hessian of a tanh MLP 784-32-10 (25,450 parameters, batch
of 64) at initialisation, the same after 300 full-batch SGD steps on a fixed
synthetic task (teacher-labelled inputs), and a dense 2000 x 2000 PSD matrix
with spectrum ``1/k``. Exact traces come from ``so.trace(method="exact")`` (the
dense trace for the synthetic matrix). At budgets of 30, 99 and 300 matvecs and
over 16 seeds, the table reports the median relative error of each estimator
(ours through ``so.trace_estimate``; curvlinops' ``hutchinson_trace``,
``hutchpp_trace`` and ``xtrace`` on a ``HessianLinearOperator`` of the same loss
and batch) and how often our reported 95% interval contains the exact value.
XTrace needs an even budget (both libraries), so it gets 98 where the budget is 99.
XNysTrace needs a PSD operator and runs on the synthetic matrix only.

Time per matvec: each case in its own subprocess (``benchmarks.harness``), the
median warm time of a 300-matvec estimate divided by 300, against the median
time of one gradient evaluation (``torch.autograd.grad`` of the same loss).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.workloads import ROWS, classification

BUDGETS = (30, 99, 300)
SEEDS = 16
OURS = ("hutchinson", "hutch++", "xtrace", "xnystrace")
PEER = {"hutchinson": "hutchinson_trace", "hutch++": "hutchpp_trace", "xtrace": "xtrace"}


def _budget(method: str, budget: int) -> int:
    return budget - 1 if method in ("xtrace",) and budget % 2 else budget


def mlp_init():
    return classification(**ROWS["mlp784"])


def mlp_trained(steps: int = 300):
    model, x, _ = classification(**ROWS["mlp784"])
    teacher = torch.randn(784, 10, generator=torch.Generator().manual_seed(1))
    y = (x @ teacher).argmax(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def psd_matrix(n: int = 2000):
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * (1.0 / torch.arange(1, n + 1, dtype=torch.float64))) @ Q.T


def _psd_operator(A):
    from secorder.operators import LeafOperator

    sizes = [1500, A.shape[0] - 1500]

    def matvec(V):
        out = torch.cat(V, dim=1) @ A
        return list(torch.split(out, sizes, dim=1))

    return LeafOperator([torch.zeros(s, dtype=A.dtype) for s in sizes], matvec, None)


def _hessian_problem(model, x, y):
    import curvlinops
    import secorder as so

    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    peer_op = curvlinops.HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)], check_deterministic=False
    )
    exact = float(so.trace(f, method="exact")(params, x, y))

    def ours(method, budget, seed):
        return so.trace_estimate(f, method=method, num_samples=budget, seed=seed)(params, x, y)

    return exact, ours, peer_op


def _psd_problem():
    from secorder.estimators import registry
    from secorder.estimators.probes import make_generator

    A = psd_matrix()
    op = _psd_operator(A)

    def ours(method, budget, seed):
        options = registry.Options(num_samples=budget, seed=seed)
        estimator = registry.check_options(method, "trace", options)
        return registry.run(op, estimator, options, None, make_generator(seed, None, A.device))

    return float(A.trace()), ours, A


def accuracy(name, exact, ours, peer_op, seeds, methods):
    import curvlinops

    rows = []
    for budget in BUDGETS:
        for method in methods:
            b = _budget(method, budget)
            errs, hits = [], 0
            for s in range(seeds):
                est = ours(method, b, s)
                errs.append(abs(float(est.value) - exact) / abs(exact))
                lo, hi = est.interval(0.95)
                hits += int(float(lo) <= exact <= float(hi))
            peer = None
            if method in PEER:
                perrs = []
                for s in range(seeds):
                    torch.manual_seed(s)
                    val = getattr(curvlinops, PEER[method])(peer_op, b)
                    perrs.append(abs(float(val) - exact) / abs(exact))
                peer = statistics.median(perrs)
            rows.append((name, budget, method, b, statistics.median(errs), peer, hits / seeds, hits, seeds))
            print(f"  {name} {method}@{b}: ours {rows[-1][4]:.4f} peer {peer if peer is None else round(peer, 4)}"
                  f" coverage {hits}/{seeds}", flush=True, file=sys.stderr)
    return rows


# -- timing cases (each in its own subprocess) -------------------------------------------------


def _case_grad():
    model, x, y = mlp_init()
    params = list(model.parameters())
    return lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params)


def _case_ours(method):
    import secorder as so

    model, x, y = mlp_init()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    tr = so.trace(f, method=method, num_samples=300, seed=0)
    return lambda: tr(params, x, y)


def _case_peer(method):
    import curvlinops

    model, x, y = mlp_init()
    op = curvlinops.HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)], check_deterministic=False
    )
    fn = getattr(curvlinops, PEER[method])
    return lambda: fn(op, 300)


CASES = {"grad": _case_grad}
for _m in PEER:
    CASES[f"ours:{_m}"] = (lambda m: lambda: _case_ours(m))(_m)
    CASES[f"curvlinops:{_m}"] = (lambda m: lambda: _case_peer(m))(_m)


def main() -> None:
    quick = "--quick" in sys.argv
    seeds = 4 if quick else SEEDS
    t0 = time.perf_counter()
    rows = []
    for name, build in (("MLP init", mlp_init), ("MLP trained", mlp_trained)):
        torch.manual_seed(0)
        exact, ours, peer_op = _hessian_problem(*build())
        print(f"{name}: exact trace {exact:.4f}", file=sys.stderr, flush=True)
        rows += accuracy(name, exact, ours, peer_op, seeds, ("hutchinson", "hutch++", "xtrace"))
    exact, ours, A = _psd_problem()
    rows += accuracy("PSD 1/k", exact, ours, A, seeds, OURS)

    timings = {case: harness.run_case("bench_estimators", case, warm=3) for case in CASES}
    grad_s = timings["grad"]["warm_s"]

    print(f"\nAccuracy: median relative error over {seeds} seeds; coverage of our 95% interval.\n")
    print("| operator | budget | method | ours | curvlinops | ours / curvlinops | 95% coverage |")
    print("|---|---|---|---|---|---|---|")
    for name, budget, method, b, ours_err, peer_err, cov, hits, n in rows:
        ratio = harness.fmt_ratio(ours_err, peer_err) if peer_err is not None else "n/a"
        peer = f"{peer_err:.4f}" if peer_err is not None else "n/a"
        label = f"{method} ({b})" if b != budget else method
        print(f"| {name} | {budget} | {label} | {ours_err:.4f} | {peer} | {ratio} | {hits}/{n} |")
    total_hits = sum(r[7] for r in rows)
    total = sum(r[8] for r in rows)
    print(f"\nOverall coverage of our 95% intervals: {total_hits}/{total} = {total_hits / total:.3f}")
    for method in OURS:
        h = sum(r[7] for r in rows if r[2] == method)
        n = sum(r[8] for r in rows if r[2] == method)
        if n:
            print(f"  {method}: {h}/{n} = {h / n:.3f}")

    print("\nTime per matvec (MLP 784-32-10, batch 64, 300-matvec estimate, median warm call / 300),")
    print(f"against one gradient evaluation ({grad_s * 1e3:.2f} ms):\n")
    print("| method | ours ms/matvec | curvlinops ms/matvec | ours / grad | ours / curvlinops |")
    print("|---|---|---|---|---|")
    for method in PEER:
        o = timings[f"ours:{method}"]["warm_s"] / 300
        p = timings[f"curvlinops:{method}"]["warm_s"] / 300
        print(f"| {method} | {o * 1e3:.3f} | {p * 1e3:.3f} | {harness.fmt_ratio(o, grad_s)} | {harness.fmt_ratio(o, p)} |")
    print(f"\n(total benchmark time {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
