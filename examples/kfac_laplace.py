"""A K-FAC Laplace approximation's log marginal likelihood, by hand, to choose a prior precision.

Train a small classifier on two noisy spirals, then approximate the posterior around
the trained weights ``theta`` by a Gaussian whose precision is the K-FAC curvature
of the summed loss plus the prior precision ``delta``: ``K + delta I``. The Laplace
approximation of the log marginal likelihood (the evidence; MacKay 1992, Immer et
al. 2021) is

    log p(D | delta) ~= -L(theta) - delta/2 |theta|^2 + P/2 log(delta) - 1/2 log det(K + delta I)

with ``L`` the summed cross-entropy and ``P`` the number of weights. ``K.logdet``
gives the last term from the Kronecker factors' eigenvalues, so every ``delta`` of
the grid costs a few small eigendecompositions, not a ``P x P`` matrix. The script
prints the evidence on a grid, next to the same formula with the exact GGN (this
network is small enough to form it), and checks that the K-FAC log-determinant is
the dense one of its own matrix.

Run: ``python examples/kfac_laplace.py``.
"""

import math

import torch
from torch import nn

import secorder as so


def spirals(n, noise, generator):
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.to(torch.float64)
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], 1) / 5
    return x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64), label


def dense_ggn(model, params, x, y):
    """The exact GGN of the summed loss, P x P (small networks only)."""
    flat, unravel = so.tree.ravel(params)
    out_of = lambda theta: torch.func.functional_call(model, unravel(theta), (x,))
    out = out_of(flat)
    J = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
    p = out.softmax(1)
    H = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    return J.T @ H @ J


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = spirals(256, 0.05, g)
    model = nn.Sequential(nn.Linear(2, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(600):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = so.params_dict(model)
    f = so.functional_loss(model, nn.CrossEntropyLoss(reduction="sum"))  # the evidence needs the summed loss
    P = so.tree.size(params)
    loss = float(f(params, x, y))
    norm2 = float(so.tree.vdot(params, params))
    accuracy = float((model(x).argmax(1) == y).double().mean())
    print(f"trained: {P} weights, summed loss {loss:.2f}, accuracy {accuracy:.3f}")

    K = so.kfac(f)(params, x, y)  # type-2 K-FAC of the summed loss: the factors, computed once
    print(K)
    G = dense_ggn(model, params, x, y)
    eye = torch.eye(P, dtype=torch.float64)

    def evidence(logdet, delta):
        return -loss - delta / 2 * norm2 + P / 2 * math.log(delta) - logdet / 2

    grid = [10.0 ** e for e in torch.linspace(-3, 2, 11).tolist()]
    print(f"{'prior precision':>16} {'K-FAC evidence':>15} {'GGN evidence':>13}")
    rows = []
    for delta in grid:
        kfac = evidence(float(K.logdet(damping=delta)), delta)
        exact = evidence(float(torch.linalg.slogdet(G + delta * eye)[1]), delta)
        rows.append((delta, kfac, exact))
        print(f"{delta:16.4g} {kfac:15.2f} {exact:13.2f}")
    best_kfac = max(rows, key=lambda r: r[1])[0]
    best_exact = max(rows, key=lambda r: r[2])[0]
    print(f"the K-FAC Laplace evidence picks prior precision {best_kfac:.3g} (the exact GGN's: {best_exact:.3g})")

    # self-checks: K.logdet is the log-determinant of K's own matrix; the evidence peaks inside the grid
    delta = best_kfac
    dense = torch.linalg.slogdet(K.to_dense() + delta * eye)[1]
    assert torch.allclose(K.logdet(damping=delta), dense, rtol=1e-8), (K.logdet(damping=delta), dense)
    assert grid[0] < best_kfac < grid[-1], "the evidence should peak inside the grid"
    # the posterior's predictive variance along a direction: a solve with the same factors
    v = so.tree.tree_map(torch.ones_like, params)
    var = float(so.tree.vdot(v, K.inverse(delta).mv(v)))
    print(f"posterior variance along the all-ones direction: {var:.4g} (prior alone: {P / delta:.4g})")
    assert 0 < var < P / delta


if __name__ == "__main__":
    main()
