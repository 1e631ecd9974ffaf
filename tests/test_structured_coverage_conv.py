"""Structured engine coverage of the convolution / pooling / padding / elementwise families (issue 14), in float64.

Per rule, from a settings list (the pattern of ``tests/test_structured_rules.py``,
whose checks run here on these settings): Jacobian products against
``vmap(vjp)``, every curvature term kind pulled back against ``J^T H J``, the
residual against the second derivative of ``<g, forward(x)>`` (reverse over
reverse, sample by sample: some of these modules have no forward-mode second
derivative in PyTorch, and PReLU's fails under ``vmap``), the parameter diagonal
against ``diag(J^T H J)``. Then models made of them against
``torch.func.hessian``, the generic path and the exact GGN.
"""

import functools
import re

import pytest
import torch
from torch import nn
from torch.func import jacrev

import secorder as so
from secorder.structured import registry
from secorder.structured.curvature import Factor
from tests import test_structured_rules as rules_tests
from tests.test_structured import check

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _bn(cls, c):
    return rules_tests._bn(cls, c)


# (id, module factory, input shape)
SETTINGS = [
    # convolutions: every dimension, transposed, groups (depthwise), padding modes, 'same'
    ("conv3d", lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
     (2, 2, 4, 5, 4)),
    ("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 4, 4)),
    ("conv1d-depthwise", lambda: nn.Conv1d(3, 3, 3, groups=3, bias=False), (2, 3, 6)),
    ("conv3d-depthwise-multiplier", lambda: nn.Conv3d(2, 4, 2, groups=2), (2, 2, 3, 3, 2)),
    ("conv2d-same-reflect", lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"), (2, 2, 4, 5)),
    ("conv1d-same", lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2), (2, 2, 7)),
    ("conv1d-circular", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), (2, 2, 5)),
    ("conv3d-replicate", lambda: nn.Conv3d(1, 2, 2, padding=1, padding_mode="replicate"), (2, 1, 3, 3, 3)),
    ("convtranspose1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2),
     (2, 2, 4)),
    ("convtranspose1d-crop", lambda: nn.ConvTranspose1d(2, 2, 2, stride=3, padding=2, output_padding=1), (2, 2, 4)),
    ("convtranspose2d-groups", lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (2, 4, 3, 3)),
    ("convtranspose3d", lambda: nn.ConvTranspose3d(2, 2, (2, 1, 2), stride=(2, 1, 1), padding=(0, 0, 1), bias=False),
     (2, 2, 2, 3, 3)),
    # pooling in 1d / 3d, every option BackPACK's tests use
    ("maxpool1d", lambda: nn.MaxPool1d(2, 1, 0, 2, ceil_mode=True), (2, 2, 7)),
    ("maxpool3d", lambda: nn.MaxPool3d(2, stride=1, padding=1, dilation=(1, 2, 1)), (2, 2, 3, 4, 3)),
    ("adaptivemaxpool2d", lambda: nn.AdaptiveMaxPool2d((2, 3)), (2, 2, 5, 4)),
    ("adaptivemaxpool1d", lambda: nn.AdaptiveMaxPool1d(3), (2, 2, 7)),
    ("adaptivemaxpool3d", lambda: nn.AdaptiveMaxPool3d((2, 1, 2)), (2, 2, 3, 3, 3)),
    ("avgpool1d", lambda: nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 2, 6)),
    ("avgpool3d", lambda: nn.AvgPool3d(2, 1, 1, divisor_override=3), (2, 2, 2, 3, 3)),
    ("adaptiveavgpool1d", lambda: nn.AdaptiveAvgPool1d(3), (2, 2, 7)),
    ("adaptiveavgpool3d", lambda: nn.AdaptiveAvgPool3d((2, 1, 2)), (2, 2, 3, 3, 3)),
    # batch norm in 3d
    ("batchnorm3d", lambda: _bn(nn.BatchNorm3d, 2), (2, 2, 2, 3, 2)),
    # elementwise
    ("logsigmoid", nn.LogSigmoid, (3, 5)),
    ("selu", nn.SELU, (3, 2, 4)),
    ("celu", lambda: nn.CELU(0.7), (3, 5)),
    ("softsign", nn.Softsign, (3, 5)),
    ("mish", nn.Mish, (3, 5)),
    ("hardswish", nn.Hardswish, (3, 5)),
    ("tanhshrink", nn.Tanhshrink, (3, 5)),
    ("hardtanh", lambda: nn.Hardtanh(-0.5, 0.8), (3, 5)),
    ("relu6-inplace", lambda: nn.ReLU6(inplace=True), (3, 5)),
    ("hardsigmoid", nn.Hardsigmoid, (3, 5)),
    ("hardshrink", nn.Hardshrink, (3, 5)),
    ("softshrink", nn.Softshrink, (3, 5)),
    ("threshold", lambda: nn.Threshold(0.1, -2.0), (3, 5)),
    ("prelu", nn.PReLU, (3, 5)),
    ("prelu-channels", lambda: nn.PReLU(2), (3, 2, 3)),
    # padding
    ("zeropad1d", lambda: nn.ZeroPad1d((1, 2)), (2, 2, 4)),
    ("zeropad2d-crop", lambda: nn.ZeroPad2d((1, -1, 2, 0)), (2, 2, 3, 3)),
    ("constantpad3d", lambda: nn.ConstantPad3d((1, 0, 0, 1, 1, 1), 0.5), (2, 1, 2, 2, 2)),
    ("reflectionpad2d", lambda: nn.ReflectionPad2d((1, 2, 0, 1)), (2, 2, 3, 4)),
    ("replicationpad1d", lambda: nn.ReplicationPad1d(2), (2, 2, 3)),
    ("circularpad3d", lambda: nn.CircularPad3d(1), (2, 1, 2, 2, 3)),
    # every registered padding type has a setting (tests/test_registries.py checks it)
    ("zeropad3d", lambda: nn.ZeroPad3d((0, 1, 1, 0, 0, 1)), (2, 1, 2, 2, 2)),
    ("constantpad1d", lambda: nn.ConstantPad1d((2, 1), -0.5), (2, 2, 3)),
    ("constantpad2d", lambda: nn.ConstantPad2d((1, 0, 0, 2), 0.25), (2, 1, 3, 2)),
    ("reflectionpad1d", lambda: nn.ReflectionPad1d((1, 2)), (2, 2, 4)),
    ("reflectionpad3d", lambda: nn.ReflectionPad3d(1), (2, 1, 2, 3, 3)),
    ("replicationpad2d", lambda: nn.ReplicationPad2d((0, 1, 2, 1)), (2, 2, 2, 3)),
    ("replicationpad3d", lambda: nn.ReplicationPad3d((1, 0, 0, 1, 1, 0)), (2, 1, 2, 2, 2)),
    ("circularpad1d", lambda: nn.CircularPad1d((1, 2)), (2, 2, 4)),
    ("circularpad2d", lambda: nn.CircularPad2d((1, 0, 0, 1)), (2, 1, 3, 3)),
]

try:  # BackPACK's custom modules (rules loaded on first lookup): the peers install BackPACK
    from backpack.custom_module.pad import Pad
    from backpack.custom_module.permute import Permute
    from backpack.custom_module.scale_module import ScaleModule
    from backpack.custom_module.slicing import Slicing
except ImportError:  # pragma: no cover
    HAVE_BACKPACK = False
else:
    HAVE_BACKPACK = True
    SETTINGS += [
        ("backpack-pad", lambda: Pad((1, 1, 2, 0, 1, 2), mode="constant", value=1.0), (2, 2, 3, 2)),
        ("backpack-pad-reflect", lambda: Pad((1, 2), mode="reflect"), (2, 2, 3)),
        ("backpack-slicing", lambda: Slicing((slice(None), 0, slice(None, None, 2), slice(0, 2))), (2, 2, 5, 3)),
        ("backpack-slicing-int", lambda: Slicing((slice(None), slice(None), -1)), (2, 3, 2)),
        ("backpack-permute", lambda: Permute(0, 2, 1, 3), (2, 2, 3, 2)),
        ("backpack-transpose", lambda: Permute(1, 2, init_transpose=True), (2, 3, 2)),
        ("backpack-scale", lambda: ScaleModule(0.3), (2, 4)),
    ]
ids = [s[0] for s in SETTINGS]


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_jacobian_products_match_vjp(setting):
    rules_tests.test_jacobian_products_match_vjp(setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_every_term_kind_pulls_back_as_jt_h_j(setting):
    rules_tests.test_every_term_kind_pulls_back_as_jt_h_j(setting)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if registry.rule_for(type(s[1]())).parameters],
                         ids=lambda s: s[0])
def test_parameter_diagonal_is_diag_of_jt_h_j(setting):
    rules_tests.test_parameter_diagonal_is_diag_of_jt_h_j(setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_residual_is_the_second_derivative_weighted_by_the_gradient(setting):
    _, rule, tensors, x = rules_tests.make(setting)
    z, state = rule.forward(x, tensors)
    g = torch.randn_like(z)
    N, F = x.shape[0], x[0].numel()

    def weighted(xn, gn):
        return (rules_tests.output(rule, tensors, xn.unsqueeze(0))[0] * gn).sum()

    try:
        expected = torch.stack([jacrev(jacrev(weighted))(x[n], g[n]) for n in range(N)]).reshape(N, F, F)
    except RuntimeError as err:  # PyTorch has no second derivative of Hardsigmoid: it is piecewise linear
        assert "not implemented" in str(err) and not rule.has_residual
        jac = functools.partial(rules_tests.per_sample_jacobian, functools.partial(rules_tests.output, rule, tensors))
        torch.testing.assert_close(jac(x + 1e-6 * torch.randn_like(x)), jac(x), rtol=0, atol=0)
        return
    if not rule.has_residual:
        torch.testing.assert_close(expected, torch.zeros_like(expected), **TOL)
        return
    term = rule.residual(state, g)
    torch.testing.assert_close(rules_tests.dense(term, x.shape), expected, **TOL)


# ---- models ---------------------------------------------------------------------------------

def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def test_cnn3d_grouped_selu_pools_batchnorm3d():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 2, padding=1, groups=2), nn.BatchNorm3d(4), nn.SELU(),
        nn.MaxPool3d(2, stride=1, ceil_mode=True), nn.AvgPool3d(2, padding=1, count_include_pad=False),
        nn.Conv3d(4, 2, 1), nn.LogSigmoid(), nn.AdaptiveAvgPool3d((1, 2, 1)), nn.Flatten(), nn.Linear(4, 3),
    ).to(DT)
    _randomise_bn(model)
    x, y = torch.randn(2, 2, 3, 3, 2, dtype=DT), torch.tensor([0, 2])
    check(model, nn.CrossEntropyLoss(), x, y)


def test_convtranspose2d_pad_mish_mse():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1), nn.Mish(), nn.ZeroPad2d((1, 0, 0, 1)),
        nn.Conv2d(2, 2, 3, stride=2, padding="valid", padding_mode="zeros"), nn.Softsign(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 2),
    ).to(DT)
    x, y = torch.randn(3, 1, 3, 3, dtype=DT), torch.randn(3, 2, dtype=DT)
    check(model, nn.MSELoss(), x, y)


def test_conv1d_depthwise_reflect_pools_bce():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, groups=2, padding=1, padding_mode="reflect"), nn.Hardswish(),
        nn.MaxPool1d(2, ceil_mode=True), nn.ConvTranspose1d(4, 2, 2, groups=2, dilation=2), nn.Tanh(),
        nn.AvgPool1d(2, padding=1), nn.ReplicationPad1d((0, 1)), nn.PReLU(2), nn.Flatten(), nn.Linear(10, 2),
    ).to(DT)
    x = torch.randn(3, 2, 7, dtype=DT)
    y = torch.softmax(torch.randn(3, 2, dtype=DT), 1)
    check(model, nn.BCEWithLogitsLoss(), x, y)


def basic_block(c):
    """A ResNet basic block ``relu(x + bn(conv(relu(bn(conv(x))))))`` written with ``so.Residual``."""
    body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                         nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    return nn.Sequential(so.Residual(body), nn.ReLU(inplace=True))


def resnet(c=2, classes=3):
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1), basic_block(c), basic_block(c),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes),
    )


def test_resnet_of_two_basic_blocks():
    torch.manual_seed(6)
    model = _randomise_bn(resnet().to(DT))
    x, y = torch.randn(3, 1, 6, 6, dtype=DT), torch.tensor([0, 2, 1])
    check(model, nn.CrossEntropyLoss(), x, y)


def test_resnet_float32_matches_generic():
    torch.manual_seed(7)
    model = resnet().eval()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 2, 1, 1])
    fn = so.hessian_diag(f)
    d = fn(params, x, y)
    assert fn.last_engine == "structured"
    ref = so.hessian_diag(f, engine="generic")(params, x, y)
    for k in params:
        assert d[k].dtype == torch.float32
        torch.testing.assert_close(d[k], ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model,x,fragment", [
    (lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(2, 2)), torch.randn(1, 2, 2, 2),
     "'0' (Conv3d) on an input of shape (1, 2, 2, 2)"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ZeroPad2d((1, 1, 0, 0)), nn.Linear(6, 2)), torch.randn(2, 3),
     "'1' (ZeroPad2d) pads 2 dims of an input of shape (2, 4), the batch dimension included"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 2), nn.MaxPool1d(2, return_indices=True)), torch.randn(2, 1, 5),
     "'1' (MaxPool1d) has return_indices=True"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 2), nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(16, 2)),
     torch.randn(2, 1, 5), "'1' (Upsample) is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(8, 2)),
     torch.randn(2, 1, 3, 3), "'1' (BatchNorm3d) expected 5D input"),
    pytest.param(lambda: nn.Sequential(nn.Linear(3, 2), Slicing((slice(0, 2),))), torch.randn(2, 3),
                 "'1' (Slicing) slices the batch dimension",
                 marks=pytest.mark.skipif(not HAVE_BACKPACK, reason="BackPACK is not installed")),
])
def test_what_falls_back_says_which_module_and_why(model, x, fragment):
    model = model().to(DT).eval()
    f = so.functional_loss(model, nn.MSELoss())
    fn = so.ggn_diag(f)
    try:
        fn(so.params_dict(model), x.to(DT), torch.randn(x.shape[0], 2, dtype=DT))
    except Exception:  # noqa: BLE001 (the generic path may raise what the model itself raises)
        pass
    assert fn.last_engine == "generic"
    assert fragment in fn.last_fallback_reason


def test_training_mode_batchnorm3d_and_grad_mode_off():
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(2, 2)).to(DT)
    f = so.functional_loss(model, nn.MSELoss())
    x, y = torch.randn(3, 1, 2, 2, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="eval"):
        so.trace(f, engine="structured")(so.params_dict(model), x, y)
    model.eval()
    fn = so.ggn_diag(f)
    with torch.no_grad():
        d = fn(so.params_dict(model), x, y)
    assert fn.last_engine == "structured"
    ref = so.ggn_diag(f, engine="generic")(so.params_dict(model), x, y)
    for k in d:
        torch.testing.assert_close(d[k], ref[k], **TOL)


def test_derived_rule_is_one_line_for_a_user_activation():
    from secorder.structured import register_rule
    from secorder.structured.rules.elementwise import DerivedActivationRule

    class Cube(nn.Module):
        def forward(self, x):
            return x * x * x / 3

    register_rule(Cube, DerivedActivationRule)
    model = nn.Sequential(nn.Linear(3, 4), Cube(), nn.Linear(4, 2))
    check(model, nn.MSELoss(reduction="sum"), torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="parameters"):
        DerivedActivationRule(nn.Linear(2, 2))



def test_backpack_parallel_nested_branches():
    pytest.importorskip("backpack")
    from backpack.custom_module.branching import Parallel

    torch.manual_seed(8)
    inner = Parallel(nn.Identity(), nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()))
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
        Parallel(nn.Identity(), nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(),
                                              nn.Conv2d(3, 2, 3, padding=1), inner)),
        nn.MaxPool2d(3, stride=2), nn.Flatten(), nn.Linear(2, 3),
    )
    check(model, nn.CrossEntropyLoss(), torch.randn(3, 3, 4, 4, dtype=DT), torch.tensor([0, 2, 1]))


def test_blocks_with_unplanned_parameters_or_merges_decline():
    pytest.importorskip("backpack")
    from backpack.custom_module.branching import Parallel

    class Mean(nn.Module):
        def forward(self, *xs):
            return sum(xs) / len(xs)

    residual = so.Residual(nn.Linear(3, 3))
    residual.extra = nn.Linear(3, 3)  # holds parameters the block's rule does not plan
    cases = [(residual, "'0' (Residual) has children its rule does not plan"),
             (Parallel(nn.Identity(), nn.Linear(3, 3), merge_module=Mean()), "only SumModule")]
    from secorder.structured import walker
    from secorder.structured.errors import Unsupported

    for block, fragment in cases:
        model = nn.Sequential(block, nn.Linear(3, 2)).to(DT)
        with pytest.raises(Unsupported, match=re.escape(fragment)):  # the module walk declines ...
            walker.plan(model)
        f = so.functional_loss(model, nn.MSELoss())
        fn = so.ggn_diag(f)
        params = {k: v for k, v in so.params_dict(model).items() if not k.startswith("0.extra")}
        x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
        d = fn(params, x, y)
        # ... and the graph walker (issue 21) runs what forward computes
        assert fn.last_engine == "structured", fn.last_fallback_reason
        ref = so.ggn_diag(f, engine="generic")(params, x, y)
        for k in ref:
            torch.testing.assert_close(d[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("error::UserWarning")  # a batching-rule fallback inside the sweep fails the test
def test_rules_compose_with_vmap_and_grad():
    pytest.importorskip("backpack")
    from backpack.custom_module.slicing import Slicing

    from tests.reference import reference_trace

    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 2, groups=2, padding=1, padding_mode="circular"), nn.SELU(), nn.MaxPool1d(2, ceil_mode=True),
        nn.ConvTranspose1d(4, 2, 2, stride=2), nn.Mish(), nn.AvgPool1d(2, padding=1), nn.ZeroPad1d((0, 1)),
        nn.LogSigmoid(), Slicing((slice(None), slice(None), slice(0, 4))), nn.Flatten(), nn.Linear(8, 3),
    ).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(3, 2, 5, dtype=DT), torch.tensor([0, 2, 1])
    diag = so.hessian_diag(f, engine="structured")
    per_example = torch.func.vmap(diag, in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    stacked = {k: torch.stack([v, -0.5 * v]) for k, v in params.items()}
    ensemble = torch.func.vmap(diag, in_dims=(0, None, None))(stacked, x, y)
    for i in range(3):
        one = diag(params, x[i:i + 1], y[i:i + 1])
        for k in params:
            torch.testing.assert_close(per_example[k][i], one[k], **TOL)
    for i in range(2):
        one = diag({k: v[i] for k, v in stacked.items()}, x, y)
        for k in params:
            torch.testing.assert_close(ensemble[k][i], one[k], **TOL)
    trace = so.trace(f, engine="structured")
    g = torch.func.grad(lambda p: f(p, x, y) + 0.1 * trace(p, x, y))(params)
    ref = torch.func.grad(lambda p: f(p, x, y) + 0.1 * reference_trace(f, (p, x, y)))(params)
    for k in params:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv", [
    lambda: nn.ConvTranspose2d(3, 4, 3, stride=2),
    lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, padding=1),
    lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2),
    lambda: nn.ConvTranspose3d(2, 2, (2, 1, 2), stride=(2, 1, 1), padding=(0, 0, 1)),
])
@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher", "hessian"])
def test_transposed_conv_weight_diagonal_from_the_columns_patches(conv, curvature, monkeypatch):
    # The weight diagonal of a transposed convolution read off its output columns' own patches
    # (ConvRule._transposed_weight_diagonal) against the generic path, behind a max pool
    # (gathered columns) and an activation (a diagonal residual for the Hessian).
    from secorder.structured.rules.conv import ConvRule

    used = []
    original = ConvRule._transposed_weight_diagonal

    def spy(self, state, terms):
        d = original(self, state, terms)
        used.append(d is not None)
        return d

    monkeypatch.setattr(ConvRule, "_transposed_weight_diagonal", spy)
    torch.manual_seed(3)
    layer = conv()
    dims = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[type(layer)]
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](2, ceil_mode=True)
    model = nn.Sequential(layer, nn.Tanh(), pool, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn((4, layer.in_channels) + (3,) * dims)
    model(x)
    model = model.to(DT).eval()
    x, y = x.to(DT), torch.randint(0, 3, (4,))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    options = dict(curvature=curvature, seed=1) if curvature == "fisher" else dict(curvature=curvature)
    fn = so.diagonal(f, engine="structured", **options)
    d = fn(params, x, y)
    ref = so.diagonal(f, engine="generic", **options)(params, x, y)
    for k in d:
        torch.testing.assert_close(d[k], ref[k], **TOL)
    assert any(used)


@pytest.mark.parametrize("scatter", [True, False])
@pytest.mark.parametrize("K,J,P,Q", [(1, 6, 16, 4), (3, 2, 9, 4), (2, 5, 12, 12)])
def test_gathered_quadratic_both_ways_equal_the_scattered_columns(scatter, K, J, P, Q, monkeypatch):
    # Gathered.quadratic picks scattering or gathering by a cost model; both are exact.
    from secorder.structured import curvature as curvature_module
    from secorder.structured.curvature import Gathered

    monkeypatch.setattr(curvature_module, "_scatter_is_cheaper", lambda *a: scatter)
    g = torch.Generator().manual_seed(K * 100 + J)
    N, C = 3, 4
    index = torch.randint(0, P, (N, C, Q), generator=g)  # repeated indices too (overlapping windows)
    term = Gathered(Factor(torch.randn(K, N, C, Q, generator=g, dtype=DT), torch.rand(K, N, generator=g, dtype=DT)),
                    index, (N, C, P))
    X = torch.randn(N, 1, J, P, generator=g, dtype=DT)
    torch.testing.assert_close(term.quadratic(X), term.as_factor().quadratic(X), **TOL)
