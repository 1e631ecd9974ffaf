"""Inverse-curvature products and the laplace-torch backends, secorder vs curvlinops, BackPACK.

Run: ``python -m benchmarks.bench_solve`` (``--quick``: one warm call per case;
``--row=cg`` or ``--row=laplace`` for one table; ``--repeat=R`` rounds;
``--structures=diag,kron`` for some of the Laplace rows; ``--iterations=M`` the CG budget).

Rows (float32, CPU, one thread: ``OMP_NUM_THREADS=1`` unless set):

* ``cg``: a conjugate-gradient solve of the damped GGN ``(G + 1e-3 I) x = v`` on
  the tanh MLP 784-256-256-10 (269,322 parameters), cross-entropy, a batch of 256
  random inputs with random labels, ``v`` the loss gradient, relative tolerance
  ``1e-6`` and a budget of ``--iterations`` (default 100). Ours:
  ``so.solve(f, curvature="ggn", damping=1e-3, tol=1e-6, max_iterations=...)``;
  curvlinops 3.0.1: ``CGInverseLinearOperator`` (GPyTorch's ``linear_cg``) on
  ``GGNLinearOperator`` plus ``1e-3`` times the identity, ``tolerance=1e-6``, the
  same ``max_iter``. Each timed call includes building the operator. Both sides
  report their iterations; the residual column is ``||v - (G + 1e-3 I) x|| / ||v||``
  of each side's ``x``, measured with the same float32 operator afterwards.
* ``laplace``: laplace-torch 0.3 ``DiagLaplace`` and ``FullLaplace`` over all weights
  (and ``KronLaplace`` where secorder has K-FAC) fitted on the digits MLP 64-32-10
  (2,410 parameters, trained 200 Adam steps) over all 1,797 images in batches of
  256, with the backends ``SecorderGGN``, ``BackPackGGN`` and ``CurvlinopsGGN``;
  the log marginal likelihood at prior precision 1 shows they agree.

Timings: the sides alternate in one process, the best of ``--repeat`` rounds (median
of the warm calls within a round) is kept; ratios are ours / peer.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.workloads import classification

ROWS = ("cg", "laplace")
DAMPING, TOL = 1e-3, 1e-6


def _time(fn: Callable[[], Any], warm: int) -> float:
    fn()  # first call (imports, allocations)
    times = []
    for _ in range(warm):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- cg ------------------------------------------------------------------------------------------


def cg_table(warm: int, rounds: int, iterations: int) -> List[str]:
    import secorder as so
    from curvlinops import CGInverseLinearOperator, GGNLinearOperator
    from curvlinops._torch_base import PyTorchLinearOperator

    class Damped(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self, A: Any, damping: float):
            super().__init__(A._in_shape, A._out_shape)
            self.A, self.damping = A, damping

        def _matmat(self, X):
            return [a + self.damping * x for a, x in zip(self.A._matmat(X), X)]

        @property
        def device(self):
            return self.A.device

        @property
        def dtype(self):
            return self.A.dtype

    model, x, y = classification((784, 256, 256, 10), 256)
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    names = [n for n, _ in model.named_parameters()]
    live = [p for _, p in model.named_parameters()]  # curvlinops needs the model's own Parameter objects
    v = torch.func.grad(lambda p: f(p, x, y))(params)
    info = {}

    def ours():
        out, i = so.solve(f, curvature="ggn", damping=DAMPING, tol=TOL, max_iterations=iterations,
                          return_info=True)(params, x, y, v)
        info["ours"] = (out, int(i.iterations))
        return out

    counter = {"matvecs": 0}

    def peer(max_iter: int, key: str):
        op = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), live, [(x, y)],
                               check_deterministic=False, progressbar=False)
        damped = Damped(op, DAMPING)
        counted_matmat = damped._matmat

        def matmat(X):
            counter["matvecs"] += 1
            return counted_matmat(X)

        damped._matmat = matmat
        counter["matvecs"] = 0
        inv = CGInverseLinearOperator(damped, tolerance=TOL, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPyTorch warns when max_iter ends the solve
            out = inv @ [v[k] for k in names]
        info[key] = (dict(zip(names, out)), counter["matvecs"] - 1)  # less its product with the zero start
        return out

    best: Dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("curvlinops", lambda: peer(iterations, "peer"))):
            best[name] = min(best.get(name, float("inf")), _time(fn, warm))
        equal = info["ours"][1]
        best["equal"] = min(best.get("equal", float("inf")), _time(lambda: peer(equal, "equal"), warm))
    op = so.linear_operator(f, curvature="ggn", damping=DAMPING)(params, x, y)
    b = op.ravel(v)

    def residual(sol):
        return float((b - op @ op.ravel(sol)).norm() / b.norm())

    rows = [("secorder so.solve (cg)", best["ours"], *info["ours"]),
            (f"curvlinops CGInverseLinearOperator, max_iter={iterations}", best["curvlinops"], *info["peer"]),
            (f"curvlinops CGInverseLinearOperator, max_iter={info['ours'][1]} (ours' iterations)", best["equal"],
             *info["equal"])]
    per_ours = best["ours"] / max(info["ours"][1], 1)
    lines = ["| method | time (s) | iterations | time / iteration (ms) | relative residual | ours / row (time) | "
             "ours / row (per iteration) |", "|---|---|---|---|---|---|---|"]
    for label, t, sol, its in rows:
        lines.append(f"| {label} | {t:.3f} | {its} | {1e3 * t / max(its, 1):.1f} | {residual(sol):.2e} | "
                     f"{harness.fmt_ratio(best['ours'], t)} | {harness.fmt_ratio(per_ours, t / max(its, 1))} |")
    return lines


# -- laplace ---------------------------------------------------------------------------------------


def digits_model():
    from secorder.cli.problem import digits_mlp

    torch.manual_seed(0)
    model, _, (x, y) = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


def laplace_table(warm: int, rounds: int) -> List[str]:
    import copy

    import secorder as so
    from laplace import Laplace
    from laplace.curvature import BackPackGGN, CurvatureInterface, CurvlinopsGGN

    from secorder.integrations.laplace import SecorderGGN

    model, x, y = digits_model()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    structures = ["diag", "full"] + (["kron"] if hasattr(so, "kfac") else [])
    chosen = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--structures=")), None)
    structures = [s for s in structures if chosen is None or s in chosen]
    backends = {"secorder": SecorderGGN, "BackPACK": BackPackGGN, "curvlinops": CurvlinopsGGN}
    models = {name: copy.deepcopy(model) for name in backends}  # BackPACK's extend() hooks its model
    best: Dict[tuple, float] = {}
    lml: Dict[tuple, float] = {}
    for _ in range(rounds):
        for structure in structures:
            for name, backend in backends.items():
                def fit():
                    la = Laplace(models[name], "classification", subset_of_weights="all", hessian_structure=structure,
                                 backend=backend)
                    la.fit(loader)
                    return la

                t = _time(fit, warm)
                best[(structure, name)] = min(best.get((structure, name), float("inf")), t)
                lml[(structure, name)] = float(fit().log_marginal_likelihood(torch.tensor(1.0)))
    # laplace-torch's own share of a fit: the same fit with a backend that returns zeros at once.
    n = sum(p.numel() for p in model.parameters())

    class Null(CurvatureInterface):
        def diag(self, X, y, **kwargs):
            return torch.zeros(()), torch.zeros(n)

    null_model = copy.deepcopy(model)
    floor = min(_time(lambda: Laplace(null_model, "classification", subset_of_weights="all",
                                      hessian_structure="diag", backend=Null).fit(loader), warm)
                for _ in range(rounds))
    # the backends' curvature calls alone, one batch of 256
    xb, yb = x[:256], y[:256]
    calls: Dict[tuple, float] = {}
    for s in structures:
        if s == "full":
            continue
        for name, backend in backends.items():
            b = backend(models[name], "classification")
            models[name].output_size = 10
            fn = (lambda b=b: b.diag(xb, yb)) if s == "diag" else (lambda b=b: b.kron(xb, yb, N=x.shape[0]))
            calls[(s, name)] = min(_time(fn, warm) for _ in range(rounds))
    lines = ["| structure | secorder (s) | BackPACK (s) | curvlinops (s) | secorder / faster peer | "
             "log marginal likelihood (secorder, BackPACK, curvlinops) |", "|---|---|---|---|---|---|"]
    for s in structures:
        ours, bp, cl = best[(s, "secorder")], best[(s, "BackPACK")], best[(s, "curvlinops")]
        lines.append(f"| {s} fit | {ours:.3f} | {bp:.3f} | {cl:.3f} | {harness.fmt_ratio(ours, min(bp, cl))} | "
                     f"{lml[(s, 'secorder')]:.2f}, {lml[(s, 'BackPACK')]:.2f}, {lml[(s, 'curvlinops')]:.2f} |")
        if (s, "secorder") in calls:
            ours, bp, cl = calls[(s, "secorder")], calls[(s, "BackPACK")], calls[(s, "curvlinops")]
            lines.append(f"| {s}: backend call, batch of 256 | {ours:.4f} | {bp:.4f} | {cl:.4f} | "
                         f"{harness.fmt_ratio(ours, min(bp, cl))} | |")
    lines.append(f"| diag fit with a backend returning zeros (laplace-torch's own work) | {floor:.3f} | | | | |")
    return lines


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    quick = "--quick" in sys.argv
    warm = 1 if quick else 3
    rounds = harness.repeat_option(1 if quick else 2)
    iterations = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--iterations=")), 100)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32")
    for row in harness.selected_rows(ROWS):
        print(f"\n## {row}\n")
        lines = cg_table(warm, rounds, iterations) if row == "cg" else laplace_table(warm, rounds)
        print("\n".join(lines))


if __name__ == "__main__":
    main()
