"""Coverage of the stochastic estimators' 95% intervals: method x operator x budget x probes.

Run: ``python -m benchmarks.coverage_intervals`` (``--seeds R``, default 200;
``--distributions rademacher,normal,sphere`` to compare test-vector distributions,
default: each method's own default; ``--budgets small`` for the minimum budgets only).

For every stochastic trace method (``hutchinson``, ``hutch++``, ``xtrace``,
``xnystrace``) and diagonal method (``hutchinson``, ``xdiag``) at budgets from its
minimum up, over ``R`` seeds (``torch.Generator().manual_seed(r)``, ``r < R``), the
table gives how often the reported 95% interval (``est.interval(0.95)``, Student's t
with ``est.dof``) contains the exact value: the trace, or for the diagonal the mean
over entries of the entrywise coverage. Operators, all float64 and dense:

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


def dense_op(A: torch.Tensor, psd: bool = False) -> LeafOperator:
    return LeafOperator([torch.zeros(A.shape[0], dtype=D)], lambda V: [V[0] @ A], None, psd=psd)


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
    if which == "small":
        cands = [lo, lo + 1, lo + 2] if not e.even else [lo, lo + 2]
    else:
        cands = [lo, lo + 1, lo + 2, lo + 4, 12, 20, 40] if not e.even else [lo, lo + 2, lo + 4, 12, 20, 40]
    out = sorted({b for b in cands if b >= lo and (not e.even or b % 2 == 0)})
    return out


def trace_coverage(fn: Callable, A: torch.Tensor, psd: bool, budget: int, seeds: int, distribution) -> float:
    op, truth = dense_op(A, psd), A.trace()
    kw = {} if distribution is None else dict(distribution=distribution)
    hits = 0
    for r in range(seeds):
        lo, hi = fn(op, budget, generator=torch.Generator().manual_seed(r), **kw).interval(0.95)
        hits += int(lo <= truth <= hi)
    return hits / seeds


def diagonal_coverage(fn: Callable, A: torch.Tensor, budget: int, seeds: int, distribution) -> float:
    op, truth = dense_op(A), A.diagonal()
    kw = {} if distribution is None else dict(distribution=distribution)
    total = 0.0
    for r in range(seeds):
        lo, hi = fn(op, budget, generator=torch.Generator().manual_seed(r), **kw).interval(0.95)
        total += float(((lo[0] <= truth) & (truth <= hi[0])).double().mean())
    return total / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--distributions", default="default",
                        help="comma-separated probe distributions, 'default' for each method's own")
    parser.add_argument("--budgets", choices=("small", "all"), default="all")
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
    for quantity, table in (("trace", TRACE), ("diagonal", DIAGONAL)):
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
                        if b // (2 if registry.get(name, quantity).even else 1) > A.shape[0]:
                            cells.append("-")
                            continue
                        if quantity == "trace":
                            c = trace_coverage(fn, A, name == "xnystrace", b, args.seeds, dist)
                        else:
                            c = diagonal_coverage(fn, A, b, args.seeds, dist)
                        cells.append(f"{c:.3f}")
                    label = dist if dist is not None else "default"
                    print(f"| {quantity} | {name} | {label} | {b} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(total {time.perf_counter() - start:.0f} s, torch {torch.__version__})")


if __name__ == "__main__":
    main()
