"""The default probe batch knows the size of one probe's intermediates (issue 26, CNN row).

The probes are drawn in blocks of ``probe_chunk`` (from the dimension alone, as
before); an operator that measured its intermediates has each block go through
the model in matvecs of ``_INTERMEDIATE_BYTES // probe_bytes`` probes.
"""

import pytest
import torch
from torch import nn
from torch.func import vmap

import secorder as so
from secorder.estimators._common import _INTERMEDIATE_BYTES, bounded_operator, probe_chunk
from secorder.estimators.hutchinson import hutchinson_trace
from secorder.operators import LeafOperator, make_operator
from secorder.operators._footprint import largest_output, measuring
from secorder.problem import Problem


def conv_problem(n=16, side=32):
    """A CNN whose first activation (n x 16 x side x side) dwarfs its 330 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10))
    x, y = torch.randn(n, 1, side, side), torch.randint(0, 10, (n,))
    return so.functional_loss(model, nn.CrossEntropyLoss()), so.params_dict(model), x, y


def mlp_problem(n=16):
    """An MLP with the same 330 parameters as :func:`conv_problem`, and small activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30))
    x, y = torch.randn(n, 10), torch.randint(0, 30, (n,))
    return so.functional_loss(model, nn.CrossEntropyLoss()), so.params_dict(model), x, y


def operator(curvature, f, params, x, y):
    """The operator, measuring its intermediates as the transforms have it do for a stochastic estimator."""
    with measuring():  # the Monte-Carlo Fisher's labels from a fixed seed: two operators of one call are equal
        op = make_operator(curvature, Problem(f, 0, False, (params, x, y)), generator=torch.Generator().manual_seed(0))
        op.probe_bytes()
    return op


def matvec_sizes(op, chunk_size, probes):
    """The probe counts of the batched matvecs that ``hutchinson_trace`` runs, and its estimate."""
    sizes = []

    def matvec(V):
        sizes.append(V[0].shape[0])
        return op.matvec(V)

    logged = LeafOperator(op.templates, matvec, op.block_matvec, probe_bytes=op.probe_bytes)
    est = hutchinson_trace(logged, probes, generator=torch.Generator().manual_seed(3), chunk_size=chunk_size)
    return sizes, est


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_default_batch_on_a_cnn_is_smaller_than_on_an_mlp_of_the_same_size(curvature):
    conv_op, mlp_op = operator(curvature, *conv_problem()), operator(curvature, *mlp_problem())
    assert conv_op.dim == mlp_op.dim == 330  # the dimension alone cannot tell them apart
    # the first activation: 16 images x 16 channels x 32 x 32, float32, per probe
    assert conv_op.probe_bytes() >= 16 * 16 * 32 * 32 * 4
    conv_sizes, _ = matvec_sizes(conv_op, None, 40)
    mlp_sizes, _ = matvec_sizes(mlp_op, None, 40)
    assert max(conv_sizes) == _INTERMEDIATE_BYTES // conv_op.probe_bytes() < 40
    assert mlp_sizes == [40]  # all the probes in one matvec, as before


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_nothing_is_measured_unless_asked(curvature):
    """Products outside a stochastic estimator (``so.hvp``, ``so.ggn_vp``) do not pay for the measurement."""
    f, params, x, y = conv_problem()
    op = make_operator(curvature, Problem(f, 0, False, (params, x, y)))
    op.matvec([torch.ones((1,) + t.shape) for t in op.templates])
    assert op.probe_bytes() is None
    assert matvec_sizes(op, None, 40)[0] == [40]  # today's rule


def test_leaf_shaped_tensors_are_not_counted():
    """A wide layer's weight gradients (100 KB per probe) are the dimension rule's business, not activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    op = operator("hessian", f, so.params_dict(model), x, y)
    assert op.probe_bytes() < 784 * 4 * 4  # the largest activation-like tensor, not the 784 x 32 gradient
    assert matvec_sizes(op, None, 300)[0] == [300]  # one batch, as before (splitting it was 1.5x slower)


def test_user_chunk_size_wins():
    op = operator("hessian", *conv_problem())
    assert bounded_operator(op, 40) is op
    assert matvec_sizes(op, 40, 40)[0] == [40]
    assert matvec_sizes(op, 25, 40)[0] == [25, 15]


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_default_gives_the_values_of_one_explicit_batch(curvature):
    f, params, x, y = conv_problem()
    probes = 40
    # the default draws the 40 probes in one block (330 parameters) and splits the matvec
    assert probe_chunk(operator(curvature, f, params, x, y), None) >= probes
    results = [so.trace(f, curvature=curvature, method="hutchinson", num_samples=probes, seed=3,
                        chunk_size=size)(params, x, y) for size in (None, probes)]
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    sizes, est = matvec_sizes(operator(curvature, f, params, x, y), None, probes)
    _, one = matvec_sizes(operator(curvature, f, params, x, y), probes, probes)
    assert len(sizes) > 1
    torch.testing.assert_close(est.value, one.value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.per_leaf, one.per_leaf, rtol=1e-5, atol=1e-6)


def test_views_are_not_counted():
    w, v = torch.ones(100, 50), torch.ones(100, 2)
    _, nbytes = largest_output(lambda: w.t() @ v)  # the 50 x 2 product; w.t() is a view of 5000 entries
    assert nbytes == 50 * 2 * 4


def test_measured_under_an_outer_vmap(monkeypatch):
    """Under ``vmap`` the build's tensors carry the outer batch (larger, so smaller matvecs): same values."""
    from secorder.estimators import _common

    # one image: 16 x 8 x 8 float32 = 4 KiB per probe; under vmap over 4 images, 16 KiB:
    # a 48 KiB budget splits the 7 probes under vmap (3 + 3 + 1), not in the loop
    monkeypatch.setattr(_common, "_INTERMEDIATE_BYTES", 3 * 4 * 16 * 8 * 8 * 4)
    f, params, x, y = conv_problem(n=4, side=8)
    sizes = []
    matvec_chunked = _common.matvec_chunked
    monkeypatch.setattr(_common, "matvec_chunked", lambda op, V, chunk: sizes.append(chunk) or matvec_chunked(op, V, chunk))

    def trace_one(xi, yi):
        return so.trace(f, method="hutchinson", num_samples=7, seed=0)(params, xi[None], yi[None])

    batched = vmap(trace_one, randomness="same")(x, y)
    assert sizes == [3]
    for i in range(4):
        torch.testing.assert_close(batched[i], trace_one(x[i], y[i]), rtol=1e-5, atol=1e-6)
    assert sizes[1:] == [12] * 4


@pytest.mark.slow
def test_torch_compile_falls_back_and_agrees():
    def f(w):
        return (torch.sin(w) * w ** 2).sum()

    w = torch.randn(7, dtype=torch.float64)
    trace = so.trace(f, method="hutchinson", num_samples=9, seed=1)
    torch.testing.assert_close(torch.compile(trace)(w), trace(w), rtol=1e-10, atol=1e-12)
