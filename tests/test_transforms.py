"""hvp, hessian_diag and trace against float64 torch.func.hessian references."""

import collections

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import secorder as so
from secorder import tree
from tests.reference import (
    assert_tree_close,
    dense_hessian,
    reference_diag,
    reference_trace,
    small_cnn,
    tanh_mlp,
)

D = torch.float64


def quadratic(A):
    return lambda x: x @ A @ x


@pytest.mark.parametrize("n", [1, 4, 17])
def test_quadratic_closed_form(n):
    A = torch.randn(n, n, dtype=D)
    x = torch.randn(n, dtype=D)
    H = A + A.T
    torch.testing.assert_close(so.hessian_diag(quadratic(A))(x), torch.diagonal(H))
    torch.testing.assert_close(so.trace(quadratic(A))(x), torch.trace(H))
    v = torch.randn(n, dtype=D)
    torch.testing.assert_close(so.hvp(quadratic(A))(x, v), H @ v)


def test_mlp_cross_entropy_matches_reference():
    model = tanh_mlp((6, 10, 4))
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(16, 6, dtype=D), torch.randint(0, 4, (16,))
    args = (params, x, y)
    assert_tree_close(so.hessian_diag(f)(*args), reference_diag(f, args))
    torch.testing.assert_close(so.trace(f)(*args), reference_trace(f, args), rtol=1e-10, atol=0)
    H, unravel = dense_hessian(f, args)
    v = tree.random_like(params, "normal")
    flat_v, _ = tree.ravel(v)
    assert_tree_close(so.hvp(f)(*args, v), unravel(H @ flat_v))


def test_small_cnn_matches_reference():
    model = small_cnn()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(4, 1, 8, 8, dtype=D), torch.randint(0, 3, (4,))
    args = (params, x, y)
    assert_tree_close(so.hessian_diag(f, chunk_size=7)(*args), reference_diag(f, args))
    torch.testing.assert_close(so.trace(f)(*args), reference_trace(f, args), rtol=1e-10, atol=0)


Pair = collections.namedtuple("Pair", ["a", "b"])


def nested_loss(p):
    a, b = p["pair"].a, p["pair"].b
    c = p["list"][0]
    d = p["list"][1]["deep"]
    return (torch.sin(a).sum() * b.pow(2).sum() + (c @ c.T).trace() * torch.tanh(d).sum()
            + (a.sum() * d.sum()) ** 2)


def nested_params():
    return {
        "pair": Pair(torch.randn(3, dtype=D), torch.randn(2, 2, dtype=D)),
        "list": [torch.randn(2, 3, dtype=D), {"deep": torch.randn(4, dtype=D)}],
    }


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_nested_pytree(chunk_size):
    p = nested_params()
    diag = so.hessian_diag(nested_loss, chunk_size=chunk_size)(p)
    assert isinstance(diag["pair"], Pair)
    assert_tree_close(diag, reference_diag(nested_loss, (p,)))
    torch.testing.assert_close(
        so.trace(nested_loss, chunk_size=chunk_size)(p), reference_trace(nested_loss, (p,))
    )


def test_argnums_tuple_and_negative():
    def f(x, s, y):
        return (x ** 2 * y ** 3).sum() * s

    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    s = torch.tensor(2.0, dtype=D)
    d = so.hessian_diag(f, argnums=(0, 2))(x, s, y)
    assert isinstance(d, tuple) and len(d) == 2
    torch.testing.assert_close(d[0], 2 * y ** 3 * s)
    torch.testing.assert_close(d[1], 6 * x ** 2 * y * s)
    torch.testing.assert_close(so.trace(f, argnums=(0, 2))(x, s, y), d[0].sum() + d[1].sum())
    torch.testing.assert_close(so.hessian_diag(f, argnums=-1)(x, s, y), d[1])
    v = (torch.ones(3, dtype=D), torch.zeros(3, dtype=D))
    hv = so.hvp(f, argnums=(0, 2))(x, s, y, v)
    torch.testing.assert_close(hv[0], 2 * y ** 3 * s)
    torch.testing.assert_close(hv[1], 6 * x * y ** 2 * s)


def test_has_aux():
    def f(x):
        loss = (x ** 3).sum()
        return loss, {"loss": loss.detach(), "n": torch.tensor(x.numel())}

    x = torch.tensor([1.0, 2.0], dtype=D)
    d, aux = so.hessian_diag(f, has_aux=True)(x)
    torch.testing.assert_close(d, 6 * x)
    torch.testing.assert_close(aux["loss"], torch.tensor(9.0, dtype=D))
    t, aux = so.trace(f, has_aux=True)(x)
    torch.testing.assert_close(t, torch.tensor(18.0, dtype=D))
    assert int(aux["n"]) == 2
    hv, aux = so.hvp(f, has_aux=True)(x, torch.ones(2, dtype=D))
    torch.testing.assert_close(hv, 6 * x)
    torch.testing.assert_close(aux["loss"], torch.tensor(9.0, dtype=D))


def test_unused_leaf_gets_zeros():
    f = lambda p: (p[0] ** 2).sum()
    d = so.hessian_diag(f)([torch.ones(2, dtype=D), torch.ones(3, dtype=D)])
    torch.testing.assert_close(d[1], torch.zeros(3, dtype=D))


def test_empty_leaf():
    f = lambda p: (p[0] ** 2).sum() + p[1].sum()
    d = so.hessian_diag(f)([torch.ones(2, dtype=D), torch.ones(0, dtype=D)])
    assert d[1].shape == (0,)
    torch.testing.assert_close(so.trace(f)([torch.ones(2, dtype=D), torch.ones(0, dtype=D)]),
                               torch.tensor(4.0, dtype=D))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_inputs(dtype, device):
    model = tanh_mlp((3, 4, 2), dtype=dtype).to(device)
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(5, 3, dtype=dtype, device=device), torch.randint(0, 2, (5,), device=device)
    d = so.hessian_diag(f)(params, x, y)
    t = so.trace(f)(params, x, y)
    for leaf in tree.leaves(d) + [t]:
        assert leaf.dtype == dtype and leaf.device.type == device.type
    ref = reference_trace(
        so.functional_loss(model.double().cpu(), F.cross_entropy),
        (so.params_dict(model), x.double().cpu(), y.cpu()),
    )
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(t.double().cpu(), ref, rtol=tol, atol=tol)


@st.composite
def shapes_and_seed(draw):
    n_leaves = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))) for _ in range(n_leaves)]
    return shapes, draw(st.integers(0, 2**16)), draw(st.one_of(st.none(), st.integers(1, 5)))


@settings(max_examples=25, deadline=None)
@given(shapes_and_seed())
def test_property_random_shapes(case):
    shapes, seed, chunk = case
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    weights = [torch.randn(s, generator=g, dtype=D) for s in shapes]

    def f(ps):
        terms = [(torch.sin(p) * w).sum() for p, w in zip(ps, weights)]
        coupling = torch.stack([p.sum() for p in ps]).prod()
        return torch.stack(terms).sum() + coupling ** 2

    assert_tree_close(so.hessian_diag(f, chunk_size=chunk)(params), reference_diag(f, (params,)))
    torch.testing.assert_close(so.trace(f, chunk_size=chunk)(params), reference_trace(f, (params,)))
    v = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    H, unravel = dense_hessian(f, (params,))
    assert_tree_close(so.hvp(f)(params, v), unravel(H @ tree.ravel(v)[0]))


def test_hvp_with_mse_loss_and_frozen_weight():
    # Forward-over-reverse fails inside PyTorch here (ZeroTensor mutation); hvp must still answer.
    model = torch.nn.Linear(3, 1).double()
    model.weight.requires_grad_(False)
    f = so.functional_loss(model, F.mse_loss)
    params = so.params_dict(model)
    x, y = torch.randn(8, 3, dtype=D), torch.randn(8, 1, dtype=D)
    v = {"bias": torch.tensor([0.5], dtype=D)}
    hv = so.hvp(f)(params, x, y, v)
    torch.testing.assert_close(hv["bias"], torch.tensor([1.0], dtype=D))  # d2/db2 mean((xw+b-y)^2) = 2
    d = so.hessian_diag(f)(params, x, y)
    torch.testing.assert_close(d["bias"], torch.tensor([2.0], dtype=D))
    # with has_aux too
    g = lambda p, x, y: (f(p, x, y), p["bias"].detach())
    hv, aux = so.hvp(g, has_aux=True)(params, x, y, v)
    torch.testing.assert_close(hv["bias"], torch.tensor([1.0], dtype=D))
