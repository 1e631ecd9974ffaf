"""float64 references built on torch.func.hessian over the raveled differentiated argument."""

import torch
from torch import nn

from secorder import tree


def dense_hessian(f, args, argnums=0):
    """Full Hessian of f w.r.t. args[argnums] (an int) as an (n, n) matrix, and the unravel fn."""
    primals = args[argnums]
    flat, unravel = tree.ravel(primals)

    def g(x):
        new = list(args)
        new[argnums] = unravel(x)
        return f(*new)

    return torch.func.hessian(g)(flat), unravel


def reference_diag(f, args, argnums=0):
    H, unravel = dense_hessian(f, args, argnums)
    return unravel(torch.diagonal(H).clone())


def reference_trace(f, args, argnums=0):
    H, _ = dense_hessian(f, args, argnums)
    return torch.trace(H)


def tanh_mlp(sizes=(5, 8, 3), dtype=torch.float64):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def small_cnn(dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).to(dtype)


def assert_tree_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert tree.structure(actual) == tree.structure(expected)
    for a, e in zip(tree.leaves(actual), tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
