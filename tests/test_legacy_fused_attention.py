"""The legacy API on models that call F.scaled_dot_product_attention (no transformers needed).

A closure runs with the composites (attention on the math kernel); a loss built
before the call holds PyTorch's fused kernel, which cannot be differentiated twice:
the error then names ``secorder.differentiable_ops()`` and keeps PyTorch's as its
cause. The functions that run the model's forward themselves and differentiate it
twice (the Gauss-Newton product, the differentiable Gauss-Newton diagonal) run it
with the composites.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from torch_secorder._fused import explain_fused_attention, has_fused_attention
from torch_secorder.approximations import fisher_diagonal
from torch_secorder.core import hvp as legacy_hvp

DT = torch.float64


class Attention(nn.Module):
    def __init__(self, d=4, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv, self.head = nn.Linear(d, 3 * d), nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(torch.tanh(a)).mean(1)


def _problem():
    torch.manual_seed(0)
    model = Attention().to(DT)
    x, y = torch.randn(3, 5, 4, dtype=DT), torch.tensor([0, 2, 1])
    return model, x, y


def _dense(model, x, y, what):
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    flat, unravel = so.tree.ravel(params)
    with so.differentiable_ops():
        if what == "hessian":
            return torch.func.hessian(lambda p: f(unravel(p), x, y))(flat), unravel
        out = lambda p: f.output(unravel(p), x)  # noqa: E731
        J = torch.func.jacrev(out)(flat).reshape(-1, flat.numel())
        o = out(flat)
        H_out = torch.func.hessian(lambda z: F.cross_entropy(z.reshape(o.shape), y))(o.flatten())
        return J.T @ H_out @ J, unravel


def test_prebuilt_loss_through_fused_attention_names_differentiable_ops():
    model, x, y = _problem()
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    assert has_fused_attention(loss)
    v = [torch.ones_like(p) for p in params]
    with pytest.raises(RuntimeError, match=r"is not implemented; .*secorder.differentiable_ops\(\)") as err:
        legacy_hvp.exact_hvp(lambda: loss, params, v)
    assert isinstance(err.value.__cause__, RuntimeError) and "scaled_dot_product" in str(err.value.__cause__)
    H, unravel = _dense(model, x, y, "hessian")
    with so.differentiable_ops():
        loss = F.cross_entropy(model(x), y)
    assert not has_fused_attention(loss)
    hv = legacy_hvp.exact_hvp(lambda: loss, params, v)
    ref = unravel(H @ torch.ones(H.shape[0], dtype=DT))
    for h, name in zip(hv, ref):
        torch.testing.assert_close(h, ref[name], rtol=1e-10, atol=1e-12)
    # the closure computing the loss itself needs nothing
    hv2 = legacy_hvp.exact_hvp(lambda: F.cross_entropy(model(x), y), params, v)
    for a, b in zip(hv, hv2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_other_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match=r"^something else$"):
        with explain_fused_attention():
            raise RuntimeError("something else")
    with pytest.raises(ValueError):
        with explain_fused_attention():
            raise ValueError("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def test_gauss_newton_product_runs_the_forward_on_differentiable_kernels():
    model, x, y = _problem()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    G, unravel = _dense(model, x, y, "ggn")
    got = legacy_hvp.gauss_newton_product(model, nn.CrossEntropyLoss(), x, y, v)
    flat_v = so.tree.ravel(dict(zip(so.params_dict(model), v)))[0]
    ref = unravel(G @ flat_v)
    for g, name in zip(got, ref):
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-12)


def test_create_graph_on_a_fused_attention_graph_warns():
    model, x, y = _problem()
    with pytest.warns(UserWarning, match="differentiable_ops"):
        fisher_diagonal.generalized_fisher_diagonal(model, model(x), y, create_graph=True)
