"""Coverage of the stochastic estimators' 95% intervals: method x operator x budget x probes.

Run: ``python -m benchmarks.coverage_intervals`` (``--seeds R``, default 200;
``--distributions rademacher,normal,sphere`` to compare test-vector distributions,
default: each method's own default; ``--budgets small`` for the minimum budgets only,
or a comma-separated list; ``--half-width`` adds each cell's median (over seeds)
interval half-width, averaged over entries or leaves;
``--per-leaf`` gives the per-leaf trace intervals' coverage instead).

For every stochastic trace method (``hutchinson``, ``hutch++``, ``xtrace``,
``xnystrace``) and diagonal method (``hutchinson``, ``xdiag``) at budgets from its
minimum up, over ``R`` seeds (``torch.Generator().manual_seed(r)``, ``r < R``), the
table gives how often the reported 95% interval (``est.interval(0.95)``, Student's t
with ``est.dof``) contains the exact value: the trace, or for the diagonal the mean
over entries of the entrywise coverage. With ``--per-leaf`` the operator is split into
leaves (the MLP by its four parameter tensors, the others into blocks of 4, 3 and the
rest) and the cell is the mean over leaves of the coverage of ``est.per_leaf_interval``.
Operators, all float64 and dense:

* ``mlp``: the Hessian of cross-entropy of a tanh MLP 4-6-3 (51 parameters, batch 20,
  ``torch.manual_seed(0)``), indefinite; XNysTrace (PSD only) gets its GGN instead,
* ``2I``: twice the identity, ``n = 10`` (the case where XTrace's leave-out
  estimators nearly agree with Rademacher test vectors),
* ``near-I``: ``I + 0.05 B B^T / n`` with ``B`` an ``n x n`` normal matrix, ``n = 40``
  (PSD, spectrum in ``[1, ~1.2]``: a large damping or weight-decay term),
* ``indef``: ``(B + B^T) / 2 + 2 I``, ``n = 40`` (indefinite, spectrum about ``[-7, 11]``).

With ``R`` seeds the coverage of a method with true coverage ``p`` has standard
deviation ``sqrt(p (1 - p) / R)`` (0.015 for ``p = 0.95``, ``R = 200``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import secorder as so
from secorder import tree
from secorder.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, xdiag, xnystrace, xtrace
from secorder.estimators import registry
from secorder.operators import LeafOperator

D = torch.float64

TRACE = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace, "xnystrace": xnystrace}
DIAGONAL = {"hutchinson": hutchinson_diagonal, "xdiag": xdiag}


MLP_LEAVES = (24, 6, 18, 3)  # the 4-6-3 MLP's weight and bias sizes, in parameter order


def dense_op(A: torch.Tensor, psd: bool = False, sizes=None) -> LeafOperator:
    """``A`` as an operator on one leaf, or on leaves of the given ``sizes``."""
    if sizes is None:
        return LeafOperator([torch.zeros(A.shape[0], dtype=D)], lambda V: [V[0] @ A], None, psd=psd)

    def matvec(V):
        out = torch.cat(V, dim=1) @ A
        return list(torch.split(out, list(sizes), dim=1))

    return LeafOperator([torch.zeros(s, dtype=D) for s in sizes], matvec, None, psd=psd)


def leaf_sizes(n: int) -> Tuple[int, ...]:
    """The leaves of ``--per-leaf``: the MLP's parameters, else blocks of 4, 3 and the rest."""
    return MLP_LEAVES if n == sum(MLP_LEAVES) else (4, 3, n - 7)


def mlp_matrices() -> Tuple[torch.Tensor, torch.Tensor]:
    """Hessian and GGN of cross-entropy of a tanh MLP 4-6-3 (51 parameters) on 20 samples."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)]
    model = torch.nn.Sequential(*layers).to(D)
    x, y = torch.randn(20, 4, dtype=D), torch.randint(0, 3, (20,))
    f = so.functional_loss(model, F.cross_entropy)
    p = so.params_dict(model)
    flat, unravel = tree.ravel(p)
    H = torch.func.hessian(lambda t: f(unravel(t), x, y))(flat)
    eye = torch.eye(flat.numel(), dtype=D)
    G = so.ggn_vp(f)
    cols = [tree.ravel(G(p, x, y, unravel(e)))[0] for e in eye]
    return H, torch.stack(cols, dim=1)


def near_identity(n: int = 40) -> torch.Tensor:
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(11), dtype=D)
    return torch.eye(n, dtype=D) + 0.05 * B @ B.T / n


def indefinite(n: int = 40) -> torch.Tensor:
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(12), dtype=D)
    return (B + B.T) / 2 + 2 * torch.eye(n, dtype=D)


def operators() -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """name -> (matrix for the general methods, PSD matrix for XNysTrace or None)."""
    H, G = mlp_matrices()
    two_i = 2 * torch.eye(10, dtype=D)
    near = near_identity()
    return {"mlp": (H, G), "2I": (two_i, two_i), "near-I": (near, near), "indef": (indefinite(), None)}


def budgets(method: str, quantity: str, which: str) -> List[int]:
    e = registry.get(method, quantity)
    lo = e.min_samples
    if which not in ("small", "all"):
        return [int(b) for b in which.split(",")]
    if which == "small":
        cands = [lo, lo + 1, lo + 2] if not e.even else [lo, lo + 2]
    else:
        cands = [lo, lo + 1, lo + 2, lo + 4, 12, 20, 40] if not e.even else [lo, lo + 2, lo + 4, 12, 20, 40]
    out = sorted({b for b in cands if b >= lo and (not e.even or b % 2 == 0)})
    return out


def trace_coverage(fn: Callable, A: torch.Tensor, psd: bool, budget: int, seeds: int, distribution,
                   per_leaf: bool = False) -> Tuple[float, float]:
    """Coverage of the 95% interval of the trace (or mean over leaves of the per-leaf ones), median half-width."""
    sizes = leaf_sizes(A.shape[0]) if per_leaf else None
    op = dense_op(A, psd, sizes)
    kw = {} if distribution is None else dict(distribution=distribution)
    if per_leaf:
        truth = torch.stack([d.sum() for d in torch.split(A.diagonal(), list(sizes))])
    else:
        truth = A.trace()
    hits, widths = 0.0, []
    for r in range(seeds):
        est = fn(op, budget, generator=torch.Generator().manual_seed(r), **kw)
        lo, hi = est.per_leaf_interval(0.95) if per_leaf else est.interval(0.95)
        hits += float(((lo <= truth) & (truth <= hi)).double().mean())
        widths.append(float(((hi - lo) / 2).mean()))
    return hits / seeds, statistics.median(widths)


def diagonal_coverage(fn: Callable, A: torch.Tensor, budget: int, seeds: int, distribution) -> Tuple[float, float]:
    """Mean over entries of the entrywise 95% intervals' coverage, and the median over seeds of their mean half-width."""
    op, truth = dense_op(A), A.diagonal()
    kw = {} if distribution is None else dict(distribution=distribution)
    total, widths = 0.0, []
    for r in range(seeds):
        lo, hi = fn(op, budget, generator=torch.Generator().manual_seed(r), **kw).interval(0.95)
        total += float(((lo[0] <= truth) & (truth <= hi[0])).double().mean())
        widths.append(float(((hi[0] - lo[0]) / 2).mean()))
    return total / seeds, statistics.median(widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--distributions", default="default",
                        help="comma-separated probe distributions, 'default' for each method's own")
    parser.add_argument("--budgets", default="all",
                        help="'all', 'small' (the minimum budgets) or a comma-separated list of budgets")
    parser.add_argument("--half-width", action="store_true", help="add each cell's median interval half-width")
    parser.add_argument("--per-leaf", action="store_true",
                        help="coverage of the per-leaf trace intervals (trace methods only)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dists = [None if d == "default" else d for d in args.distributions.split(",")]
    wanted = None if args.methods is None else set(args.methods.split(","))
    ops = operators()
    start = time.perf_counter()
    print(f"95% interval coverage over {args.seeds} seeds (binomial sd at 0.95: "
          f"{(0.95 * 0.05 / args.seeds) ** 0.5:.3f})\n")
    print("| quantity | method | probes | budget | " + " | ".join(ops) + " |")
    print("|---|---|---|---|" + "---|" * len(ops))
    quantities = (("trace", TRACE),) if args.per_leaf else (("trace", TRACE), ("diagonal", DIAGONAL))
    for quantity, table in quantities:
        for name, fn in table.items():
            if wanted is not None and name not in wanted:
                continue
            for dist in dists:
                for b in budgets(name, quantity, args.budgets):
                    cells = []
                    for op_name, (A, P) in ops.items():
                        if name == "xnystrace":
                            if P is None:
                                cells.append("n/a (indefinite)")
                                continue
                            A = P
                        top = registry.max_samples(registry.get(name, quantity), A.shape[0])
                        if top is not None and b > top:
                            cells.append("-")
                            continue
                        if quantity == "trace":
                            c, w = trace_coverage(fn, A, name == "xnystrace", b, args.seeds, dist, args.per_leaf)
                        else:
                            c, w = diagonal_coverage(fn, A, b, args.seeds, dist)
                        cells.append(f"{c:.3f}" + (f" ({w:.3g})" if args.half_width else ""))
                    label = dist if dist is not None else "default"
                    print(f"| {quantity} | {name} | {label} | {b} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(total {time.perf_counter() - start:.0f} s, torch {torch.__version__})")


if __name__ == "__main__":
    main()
