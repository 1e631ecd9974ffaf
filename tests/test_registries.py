"""One registry type (issue 24): curvatures, estimators, structured rules and forward-Laplacian rules are
``secorder.registry.Registry`` tables; re-registering needs ``replace=True``; a rules module that fails to
import is reported at the first lookup, naming the module; every registered entry has a test setting."""

from __future__ import annotations

import pathlib
import sys
import types

import pytest
import torch
from torch import nn

import secorder as so
from secorder.estimators import registry as estimators
from secorder.estimators.registry import Options
from secorder.forward_laplacian import registry as laplacian_rules
from secorder.operators import CURVATURES, LeafOperator
from secorder.operators import register as register_curvature
from secorder.registry import LazyEntryError, Registry
from secorder.structured import registry as structured

DT = torch.float64
TESTS = pathlib.Path(__file__).parent


def test_every_table_is_a_registry():
    for table in (CURVATURES, estimators.ESTIMATORS, structured.RULES, laplacian_rules.RULES):
        assert isinstance(table, Registry) and len(table) > 0


def test_reregistering_without_replace_is_an_error():
    with pytest.raises(ValueError, match="curvature 'ggn' is already registered; pass replace=True"):
        register_curvature(CURVATURES.get("ggn"))
    register_curvature(CURVATURES.get("ggn"), replace=True)
    hutch = estimators.get("hutchinson", "diagonal")
    with pytest.raises(ValueError, match="method 'hutchinson' for the diagonal is already registered"):
        estimators.register(hutch)
    estimators.register(hutch, replace=True)
    rule = laplacian_rules.lookup(torch.sin)
    with pytest.raises(ValueError, match="forward-Laplacian rule .*sin is already registered"):
        laplacian_rules.register(torch.sin)(laplacian_rules.lookup(torch.cos))
    laplacian_rules.register(torch.sin)(rule)  # the same rule again: nothing changes
    assert laplacian_rules.lookup(torch.sin) is rule
    with pytest.raises(ValueError, match="already has the rule"):
        structured.register_rule(nn.Linear, structured.rule_for(nn.ReLU))


def test_a_rules_module_that_fails_to_import_is_reported_naming_it(monkeypatch):
    monkeypatch.setattr(structured.RULES, "_loaders", {})
    fake = types.ModuleType("fakepkg_24")
    Layer = type("Layer", (nn.Module,), {"__module__": "fakepkg_24.layers"})
    structured.register_lazy("fakepkg_24", "secorder._no_such_rules_24")  # package not imported: deferred
    for _ in range(2):  # raised at every lookup, never swallowed
        with pytest.raises(LazyEntryError, match="secorder._no_such_rules_24"):
            structured.rule_for(Layer)
    monkeypatch.setitem(sys.modules, "fakepkg_24", fake)
    with pytest.raises(LazyEntryError, match="secorder._no_such_rules_24"):  # imported already: at once
        structured.register_lazy("fakepkg_24", "secorder._no_such_rules_24")
    # and a model with such a layer does not silently take the generic path
    f = so.functional_loss(nn.Sequential(nn.Linear(2, 2), Layer()), nn.MSELoss())
    with pytest.raises(LazyEntryError):
        so.diagonal(f)(so.params_dict(f.model), torch.ones(3, 2), torch.ones(3, 2))


# ---- every registered curvature has a setting -------------------------------------------------------

def _linear_problem(n: int):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    f = so.functional_loss(model, nn.MSELoss(reduction="sum"))
    return f, so.params_dict(model), torch.randn(n, 3, dtype=DT), torch.randn(n, 2, dtype=DT)


def _hessian_trace(f, p, x, y):
    H = torch.func.hessian(lambda q: f(q, x, y))(p)
    return sum(H[k][k].reshape(p[k].numel(), p[k].numel()).trace() for k in p)


def _ef_trace(f, p, x, y):  # sum_n |g_n|^2 for a sum-reduced loss
    g = torch.func.vmap(torch.func.grad(lambda q, xi, yi: f(q, xi[None], yi[None])), in_dims=(None, 0, 0))(p, x, y)
    return sum((t ** 2).sum() for t in g.values())


# name -> (samples, options, reference, tolerance); a linear model with a sum-reduced MSE: GGN == Hessian,
# and for one sample K-FAC and EK-FAC are exact.
CURVATURE_SETTINGS = {
    "hessian": (4, {}, _hessian_trace, 1e-10),
    "ggn": (4, {}, _hessian_trace, 1e-10),
    "fisher": (4, {"mc_samples": 4000, "seed": 0}, _hessian_trace, 0.05),  # ~5 relative std errors (0.010)
    "empirical_fisher": (4, {}, _ef_trace, 1e-10),
    "kfac": (1, {}, _hessian_trace, 1e-10),
    "ekfac": (1, {}, _hessian_trace, 1e-10),
}


def test_every_registered_curvature_has_a_setting():
    assert set(CURVATURES.names()) == set(CURVATURE_SETTINGS)


@pytest.mark.parametrize("name", sorted(CURVATURE_SETTINGS))
def test_curvature_setting(name):
    n, options, reference, rtol = CURVATURE_SETTINGS[name]
    f, p, x, y = _linear_problem(n)
    got = so.trace(f, curvature=name, engine="generic", **options)(p, x, y)
    torch.testing.assert_close(got, reference(f, p, x, y), rtol=rtol, atol=1e-10)


# ---- every registered estimator has a setting -----------------------------------------------------------

def _psd_operator(n: int = 12):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(n, 4, dtype=DT, generator=g)
    A = B @ B.T + torch.diag(torch.linspace(0.1, 1.0, n, dtype=DT))
    return A, LeafOperator([torch.zeros(n, dtype=DT)], lambda V: [V[0] @ A], lambda i, Vi: Vi @ A, psd=True)


# (name, quantity) -> num_samples (None: the method's default); the check: within 6 of its own standard errors
ESTIMATOR_SETTINGS = {
    ("exact", "trace"): None, ("hutchinson", "trace"): 40, ("hutch++", "trace"): 12, ("xtrace", "trace"): 12,
    ("xnystrace", "trace"): 12, ("exact", "diagonal"): None, ("hutchinson", "diagonal"): 40,
    ("xdiag", "diagonal"): 12,
}


def test_every_registered_estimator_has_a_setting():
    assert set(estimators.ESTIMATORS.names()) == set(ESTIMATOR_SETTINGS)


@pytest.mark.parametrize("key", sorted(ESTIMATOR_SETTINGS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_estimator_setting(key):
    A, op = _psd_operator()
    est = estimators.get(*key)
    got = estimators.run(op, est, Options(num_samples=ESTIMATOR_SETTINGS[key]), None,
                         torch.Generator().manual_seed(0))
    if key[1] == "trace":
        value, stderr, truth = got.value, got.stderr, A.trace()
    else:
        value, stderr, truth = got.value[0], got.stderr[0], A.diagonal()
    assert bool(((value - truth).abs() <= 6 * stderr + 1e-9).all()), (key, value, truth, stderr)
    if not est.stochastic:
        assert bool((stderr == 0).all())


# ---- every registered structured rule has a setting -------------------------------------------------

# rules with no line in the two SETTINGS lists: the test file whose own settings exercise them
ELSEWHERE = {
    "secorder.structured.blocks.Residual": "test_structured.py",
    "secorder.structured.blocks.Parallel": "test_structured_transformer.py",
    "backpack.custom_module.branching.Parallel": "test_structured_coverage_conv.py",
    "secorder.structured.transformer.ScaledDotProductAttention": "test_structured_transformer.py",
    "torch.nn.modules.sparse.Embedding": "test_structured_transformer.py",
    "secorder.structured.transformer.PositionalEmbedding": "test_structured_transformer.py",
    "torch.nn.modules.normalization.LayerNorm": "test_structured_transformer.py",
    "secorder.structured.transformer.Transpose": "test_structured_transformer.py",
    "torch.nn.modules.rnn.RNN": "test_structured_transformer.py",  # declined, with the reason
    "torch.nn.modules.rnn.LSTM": "test_structured_transformer.py",
    "torch.nn.modules.rnn.GRU": "test_structured_transformer.py",
    "torch.nn.modules.activation.MultiheadAttention": "test_structured_transformer.py",
}


def test_every_registered_structured_rule_has_a_setting():
    from tests import test_structured_coverage_conv as conv_tests
    from tests import test_structured_rules as rules_tests

    covered = {type(s[1]()) for s in rules_tests.SETTINGS + conv_tests.SETTINGS}
    missing = []
    for module_type, rule in structured.RULES.items():
        shipped = rule.__module__.startswith("secorder.structured.rules.") and not rule.__module__.endswith(".example")
        if module_type in covered or not shipped:  # rules that tests and doctests register are not secorder's
            continue
        name = f"{module_type.__module__}.{module_type.__qualname__}"
        where = ELSEWHERE.get(name)
        if where is None or module_type.__name__ not in (TESTS / where).read_text():
            missing.append(name)
    assert not missing, f"registered structured rules without a test setting: {missing}"
