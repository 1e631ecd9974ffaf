"""Structured exact engine: agreement with float64 torch.func.hessian and with the generic path."""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder import tree
from secorder.structured import Unsupported, model_diagonal, model_trace
from tests.reference import reference_diag

RTOL = 1e-10
DT = torch.float64


def rel_err(actual, expected):
    a, e = tree.ravel(actual)[0], tree.ravel(expected)[0]
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def reference_ggn_diag(f, params, x, y):
    flat, unravel = tree.ravel(params)
    out_fn = lambda u: torch.func.functional_call(f.model, unravel(u), (x,))
    out = out_fn(flat)
    J = torch.func.jacrev(out_fn)(flat).reshape(out.numel(), -1)
    H = torch.func.hessian(lambda o: f.loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return unravel(torch.einsum("ij,ik,kj->j", J, H, J))


def mlp(act, sizes=(4, 5, 6, 3)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def check(model, loss_fn, x, y, ggn=True):
    model = model.to(DT).eval()
    f = so.functional_loss(model, loss_fn)
    params = so.params_dict(model)
    diag_fn, trace_fn = so.hessian_diag(f), so.trace(f)
    d, t = diag_fn(params, x, y), trace_fn(params, x, y)
    assert diag_fn.last_engine == "structured" and trace_fn.last_engine == "structured"
    ref = reference_diag(f, (params, x, y))
    assert rel_err(d, ref) < RTOL
    rt = sum(v.sum() for v in ref.values())
    assert abs((t - rt) / rt) < RTOL
    generic = so.hessian_diag(f, engine="generic")(params, x, y)
    assert rel_err(d, generic) < RTOL
    for k in params:
        assert d[k].shape == params[k].shape and d[k].dtype == params[k].dtype
    if ggn:
        g_fn = so.ggn_diag(f)
        g = g_fn(params, x, y)
        assert g_fn.last_engine == "structured"
        gref = reference_ggn_diag(f, params, x, y)
        assert rel_err(g, gref) < RTOL
        gt = so.ggn_trace(f)(params, x, y)
        assert abs((gt - sum(v.sum() for v in gref.values())) / gt) < RTOL
    return d


ACTS = [nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.Softplus,
        functools.partial(nn.GELU, approximate="tanh")]


@pytest.mark.parametrize("act", ACTS)
def test_activations_deep_mlp(act):
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    check(mlp(act, (4, 5, 6, 4, 3)), nn.CrossEntropyLoss(), x, y)


LOSSES = [
    (nn.CrossEntropyLoss(), "class"),
    (nn.CrossEntropyLoss(reduction="sum"), "class"),
    (F.cross_entropy, "class"),
    (functools.partial(F.cross_entropy, reduction="sum"), "class"),
    (nn.CrossEntropyLoss(ignore_index=1), "class"),
    (nn.CrossEntropyLoss(), "prob"),
    (nn.MSELoss(), "real"),
    (nn.MSELoss(reduction="sum"), "real"),
    (F.mse_loss, "real"),
    (nn.BCEWithLogitsLoss(), "prob"),
    (nn.BCEWithLogitsLoss(reduction="sum"), "prob"),
    (functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"), "prob"),
]


@pytest.mark.parametrize("loss_fn,target", LOSSES, ids=lambda v: repr(v)[:40])
def test_losses(loss_fn, target):
    x = torch.randn(6, 4, dtype=DT)
    y = {"class": torch.tensor([0, 1, 2, 1, 0, 2]), "real": torch.randn(6, 3, dtype=DT),
         "prob": torch.softmax(torch.randn(6, 3, dtype=DT), 1)}[target]
    check(mlp(nn.Tanh), loss_fn, x, y)


def test_cnn_every_module():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(2, 3, 2, stride=2, bias=False), nn.Sigmoid(), nn.Identity()),
        nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(12, 5), nn.ELU(), nn.Dropout(0.5), nn.BatchNorm1d(5), nn.Linear(5, 3),
    ).to(DT)
    for bn in (model[1], model[11]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x, y = torch.randn(4, 1, 8, 8, dtype=DT), torch.randint(0, 3, (4,))
    check(model, nn.CrossEntropyLoss(), x, y)


def test_conv1d_dilation_padding_mse():
    model = nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(18, 2))
    check(model, nn.MSELoss(), torch.randn(3, 2, 8, dtype=DT), torch.randn(3, 2, dtype=DT))


def test_relu_hessian_equals_ggn_and_tanh_does_not():
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    for act, equal in ((nn.ReLU, True), (nn.Tanh, False)):
        model = mlp(act)
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        params = so.params_dict(model)
        h, g = so.hessian_diag(f)(params, x, y), so.ggn_diag(f)(params, x, y)
        assert (rel_err(h, g) < RTOL) == equal


def test_frozen_parameters_are_constants():
    model = mlp(nn.Tanh)
    model[0].weight.requires_grad_(False)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    assert "0.weight" not in params
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    fn = so.hessian_diag(f)
    d = fn(params, x, y)
    assert fn.last_engine == "structured" and list(d) == list(params)
    assert rel_err(d, reference_diag(f, (params, x, y))) < RTOL


def test_unsupported_module_falls_back_exactly(caplog):
    model = nn.Sequential(nn.Linear(4, 5), nn.GroupNorm(1, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    fn = so.hessian_diag(f)
    with caplog.at_level(logging.DEBUG, logger="secorder.structured"):
        d = fn(params, x, y)
    assert fn.last_engine == "generic" and "GroupNorm" in fn.last_fallback_reason
    assert "GroupNorm" in caplog.text
    assert rel_err(d, reference_diag(f, (params, x, y))) < RTOL
    g_fn = so.ggn_diag(f)
    g = g_fn(params, x, y)
    assert g_fn.last_engine == "generic"
    assert rel_err(g, reference_ggn_diag(f, params, x, y)) < RTOL
    with pytest.raises(ValueError, match="GroupNorm"):
        so.trace(f, engine="structured")(params, x, y)
    with pytest.raises(Unsupported, match="'1'"):
        so.ggn_trace(f, engine="structured")(params, x, y)


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(3)])
def test_training_mode_is_refused_by_the_engine(layer):
    model = nn.Sequential(nn.Linear(4, 3), layer).to(DT).train()
    f = so.functional_loss(model, nn.MSELoss())
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
    with pytest.raises(ValueError, match="eval"):
        so.trace(f, engine="structured")(so.params_dict(model), x, y)
    assert model_trace(model, nn.MSELoss(), x, y) is None


def test_forcing_generic_and_bad_engine():
    model = mlp(nn.Tanh)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    fn = so.trace(f, engine="generic")
    fn(so.params_dict(model), torch.randn(2, 4, dtype=DT), torch.tensor([0, 1]))
    assert fn.last_engine == "generic"
    with pytest.raises(ValueError, match="engine"):
        so.hessian_diag(f, engine="fast")
    with pytest.raises(TypeError, match="engine"):
        so.trace(f, engine=1)
    with pytest.raises(TypeError, match="functional_loss"):
        so.ggn_diag(lambda p: p.sum())


def test_non_functional_loss_uses_generic():
    fn = so.hessian_diag(lambda p: (p ** 3).sum())
    torch.testing.assert_close(fn(torch.tensor([1.0, 2.0])), torch.tensor([6.0, 12.0]))
    assert fn.last_engine == "generic"
    with pytest.raises(ValueError, match="FunctionalLoss"):
        so.hessian_diag(lambda p: (p ** 3).sum(), engine="structured")(torch.ones(2))


def test_residual_blocks_nested_mlp():
    body = nn.Sequential(nn.Linear(5, 5), nn.Sigmoid(), so.Residual(nn.Sequential(nn.Linear(5, 5), nn.ELU())),
                         nn.Linear(5, 5))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), so.Residual(body), nn.Tanh(), so.Residual(nn.Identity()),
                          nn.Linear(5, 3))
    x, y = torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    check(model, nn.CrossEntropyLoss(), x, y)


def test_residual_block_first_and_frozen():
    # The first parameters sit inside the block; the block's first layer is frozen.
    model = nn.Sequential(so.Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))), nn.Softplus(),
                          nn.Linear(4, 2)).to(DT)
    model[0].body[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    check(model, nn.MSELoss(reduction="sum"), x, y)


def test_resnet_style_conv_block():
    torch.manual_seed(2)
    block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), so.Residual(block), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).to(DT)
    for bn in (block[1], block[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(3, 1, 6, 6, dtype=DT), torch.tensor([0, 2, 1])
    check(model, nn.CrossEntropyLoss(), x, y)


def test_residual_block_that_changes_shape_falls_back():
    model = nn.Sequential(so.Residual(nn.Linear(4, 3)), nn.Linear(3, 2)).to(DT)
    f = so.functional_loss(model, nn.MSELoss())
    with pytest.raises(ValueError, match="residual block"):
        so.trace(f, engine="structured")(so.params_dict(model), torch.randn(2, 4, dtype=DT), torch.randn(2, 2, dtype=DT))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_activation_then_overlapping_maxpool(act):
    # Fused activation + max pool (derivative gathered to the pooled resolution), overlapping windows.
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), act(), nn.MaxPool2d(3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)
    x, y = torch.randn(3, 1, 7, 7, dtype=DT), torch.tensor([0, 2, 1])
    check(model, nn.CrossEntropyLoss(reduction="sum"), x, y)


@pytest.mark.parametrize("freeze_first", [False, True])
def test_benchmark_cnn_shape(freeze_first):
    # The benchmark's CNN, shrunk; freezing the first conv makes the second one the first with parameters.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3), nn.Tanh(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 4)).to(DT)
    if freeze_first:
        model[0].requires_grad_(False)
    x, y = torch.randn(3, 1, 10, 10, dtype=DT), torch.tensor([0, 3, 1])
    check(model, nn.CrossEntropyLoss(), x, y)
