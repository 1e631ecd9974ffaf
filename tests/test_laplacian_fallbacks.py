"""so.laplacian, issue 25: what the forward Laplacian must not answer itself (conversions, invalid calls,
custom autograd Functions, failing rules), and the PINN gradient through LayerNorm on the exact path.

Each test failed on the main branch before its fix (the item of issue 25 is in the docstring).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so

DT = torch.float64
X = torch.tensor([1.0, 2.0, -1.0, 0.5, -2.0, 1.5], dtype=DT)


def _exact_laplacian(f, x):
    """Reverse over reverse (torch.func.hessian's forward-mode outer level would not honour no_grad inside f)."""
    return torch.func.jacrev(torch.func.jacrev(f))(x).diagonal().sum()


@pytest.mark.parametrize("f, expected", [
    (lambda x: (x.to(torch.complex128) ** 2).real.sum(), 12.0),
    (lambda x: x.type(torch.complex128).abs().pow(4).sum(), None),
    (lambda x: x.to(dtype=torch.complex64).abs().pow(2).sum(), 12.0),
], ids=["to-complex", "type-complex-abs", "to-complex64"])
def test_complex_conversions_are_not_constants(f, expected):
    """Item 4: a conversion that keeps the value differentiable returned a Laplacian of 0.0."""
    fn = so.laplacian(f)
    got = fn(X)
    ref = so.laplacian(f, method="exact")(X)
    assert fn.last_method == "exact" and "complex" in fn.last_fallback_reason
    assert torch.allclose(got, ref, rtol=1e-6)
    if expected is not None:
        assert torch.allclose(got.to(DT), torch.tensor(expected, dtype=DT), rtol=1e-6)
    with pytest.raises(so.forward_laplacian.UncoveredOperation):
        so.laplacian(f, method="forward")(X)


def test_unique_is_a_selection_not_a_constant():
    """Item 4: ``(x.unique() ** 2).sum()`` gave 0.0 (``unique`` was registered as a constant)."""
    x = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0], dtype=DT)
    got = so.laplacian(lambda x: (x.unique() ** 2).sum() + x.unique().exp().sum())(x)
    assert torch.allclose(got, 2 * 5 + x.exp().sum())
    values, inverse, counts = (lambda x: torch.unique(x, return_inverse=True, return_counts=True))(x)
    f = lambda x: (torch.unique(x, return_inverse=True)[0] ** 3).sum()
    assert torch.allclose(so.laplacian(f, method="forward")(x), (6 * x).sum())


def test_weighted_bincount_is_not_a_constant():
    idx = torch.tensor([0, 2, 2, 1, 0, 1])
    f = lambda x: (torch.bincount(idx, weights=x) ** 2).sum()
    fn = so.laplacian(f)
    with pytest.raises((NotImplementedError, RuntimeError), match="bincount"):  # PyTorch has no derivative
        fn(X)
    assert fn.last_method == "exact"


@pytest.mark.parametrize("f", [
    lambda x: F.layer_norm(x.reshape(2, 3), (6,)).pow(3).sum(),
    lambda x: F.layer_norm(x.reshape(2, 3), (3,), torch.ones(1, dtype=DT)).pow(3).sum(),
    lambda x: F.batch_norm(x.reshape(2, 3), torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT)).pow(3).sum(),
    lambda x: F.dropout(x, p=1.5, training=False).pow(3).sum(),
    lambda x: F.dropout(x, p=-0.1, training=False).pow(3).sum(),
    lambda x: F.dropout2d(x.reshape(1, 2, 3), p=2.0, training=False).pow(3).sum(),
], ids=["layer_norm-shape", "layer_norm-weight", "batch_norm-channels", "dropout-p", "dropout-negative",
        "dropout2d-p"])
def test_calls_eager_pytorch_rejects_are_rejected(f):
    """Item 5: the forward Laplacian returned numbers for calls eager PyTorch rejects."""
    with pytest.raises((RuntimeError, ValueError)) as eager:
        f(X)
    for method in ("auto", "forward"):
        with pytest.raises(type(eager.value)):
            so.laplacian(f, method=method)(X)


class _CubeStraightThrough(torch.autograd.Function):
    """Forward ``x ** 3``, backward the identity: the user's definition of the derivative."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent

    @staticmethod
    def vmap(info, in_dims, x):
        return x ** 3, in_dims[0]


def test_custom_autograd_function_takes_its_backward_not_its_forward():
    """Item 8: the forward Laplacian traced into the forward (1004.87 where autograd gives 12.0)."""
    f = lambda x: (_CubeStraightThrough.apply(x) ** 2).sum() + x.sum() ** 2
    fn = so.laplacian(f)
    got = fn(X)
    assert fn.last_method == "exact" and "custom autograd.Function" in fn.last_fallback_reason
    assert torch.allclose(got, so.laplacian(f, method="exact")(X))
    assert torch.allclose(got, _exact_laplacian(f, X))  # torch.func.hessian: the straight-through definition
    with pytest.raises(so.forward_laplacian.UncoveredOperation, match="gradients off"):
        so.laplacian(f, method="forward")(X)


def test_no_grad_inside_f_is_respected_and_no_grad_outside_is_not_a_fallback():
    """``torch.no_grad()`` inside f makes a constant (as torch.func does); around the call it changes nothing."""
    def f(x):
        with torch.no_grad():
            scale = x.abs().sum()
        return scale * (x ** 2).sum()

    fn = so.laplacian(f)
    assert torch.allclose(fn(X), _exact_laplacian(f, X)) and fn.last_method == "exact"
    assert torch.allclose(fn(X), X.abs().sum() * 2 * X.numel())  # the scale is a constant
    g = lambda x: (x.sin() ** 2).sum()
    with torch.no_grad():
        got = so.laplacian(g)(X)
    assert torch.allclose(got, _exact_laplacian(g, X)) and not got.requires_grad


def test_a_rule_that_fails_falls_back_in_auto_mode():
    """Item 11: ``column_stack`` is covered, but its rule's vmap has no batching rule: auto mode crashed."""
    f = lambda z: torch.column_stack([z, z**2]).pow(2).sum()
    fn = so.laplacian(f)
    got = fn(X)
    assert fn.last_method == "exact" and "column_stack" in fn.last_fallback_reason
    assert torch.allclose(got, _exact_laplacian(f, X))
    with pytest.raises(so.forward_laplacian.UncoveredOperation, match="its rule failed"):
        so.laplacian(f, method="forward")(X)


def test_pinn_gradient_through_layer_norm_on_the_exact_path():
    """Item 6: the PINN loss's gradient through ``so.laplacian(..., method="exact")`` with LayerNorm was 10.6%
    off (PyTorch's third derivative of layer_norm); ``"forward"`` was right. Both against central differences."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    params = so.params_dict(model)
    points = torch.randn(5, 2, dtype=DT)

    def pinn_loss(p, method):
        u = lambda x: torch.func.functional_call(model, p, (x,)).squeeze()
        lap = torch.func.vmap(so.laplacian(u, method=method))(points)
        return (lap ** 2).mean()

    flat, unravel = so.tree.ravel(params)
    d = torch.randn(flat.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    eps = 1e-5
    fd = (pinn_loss(unravel(flat + eps * d), "exact") - pinn_loss(unravel(flat - eps * d), "exact")) / (2 * eps)
    for method in ("exact", "forward"):
        g = so.tree.ravel(torch.func.grad(lambda p: pinn_loss(p, method))(params))[0]
        assert torch.allclose((g * d).sum(), fd, rtol=1e-6), method
