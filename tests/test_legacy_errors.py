"""Bad input to the legacy API: clear messages, and still ``RuntimeError`` for old ``except`` clauses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.core import hvp as hvp_module
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from torch_secorder.core.hvp import approximate_hvp, exact_hvp, gauss_newton_product, model_hvp

x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
vec = torch.ones(3)


def _ones_like(params):
    if not isinstance(params, list):
        return vec
    return [torch.ones_like(t) if isinstance(t, torch.Tensor) else t for t in params]


# name -> (func, params) -> result; every closure-based function of the legacy API.
CLOSURE_FNS = {
    "hessian_diagonal": lambda f, p: hessian_diagonal(f, p),
    "hessian_diagonal_strict": lambda f, p: hessian_diagonal(f, p, strict=True),
    "hessian_trace": lambda f, p: hessian_trace(f, p),
    "exact_hvp": lambda f, p: exact_hvp(f, p, _ones_like(p)),
    "approximate_hvp": lambda f, p: approximate_hvp(f, p, _ones_like(p)),
    "hutchinson_trace": lambda f, p: hvp_module.hessian_trace(f, p, num_samples=2),
}


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_non_scalar_loss(name):
    with pytest.raises(RuntimeError, match=r"scalar.*shape \(3,\).*grad can be implicitly created only for scalar outputs") as info:
        CLOSURE_FNS[name](lambda: x ** 2, [x])
    assert isinstance(info.value, ValueError) and isinstance(info.value, LegacyValueError)


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_one_element_loss_is_accepted(name):
    # PyTorch (and so the old package) accepted a one-element loss of any shape.
    CLOSURE_FNS[name](lambda: (x ** 2).sum().reshape(1, 1), [x])


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_loss_not_a_tensor(name):
    with pytest.raises(TypeError, match="func must return a scalar tensor, got float") as info:
        CLOSURE_FNS[name](lambda: 1.0, [x])
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_empty_params(name):
    with pytest.raises(ValueError, match="params is empty") as info:
        CLOSURE_FNS[name](lambda: (x ** 2).sum(), [])
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_params_not_tensors(name):
    with pytest.raises(TypeError, match=r"params\[1\] must be a tensor, got float") as info:
        CLOSURE_FNS[name](lambda: (x ** 2).sum(), [x, 1.0])
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, LegacyTypeError)
    with pytest.raises(TypeError, match="params must be a list of tensors, got int"):
        CLOSURE_FNS[name](lambda: (x ** 2).sum(), 3)


@pytest.mark.parametrize("name", CLOSURE_FNS)
def test_func_not_callable(name):
    with pytest.raises(TypeError, match="func must be a callable"):
        CLOSURE_FNS[name]((x ** 2).sum(), [x])


@pytest.mark.parametrize("fn", [exact_hvp, approximate_hvp])
def test_v_wrong_length_and_shapes(fn):
    y = torch.ones(2, 2, requires_grad=True)
    f = lambda: (x ** 2).sum() + (y ** 2).sum()
    with pytest.raises(ValueError, match=r"one tensor per parameter: got a single tensor for 2 parameter") as info:
        fn(f, [x, y], vec)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match=r"got 1 tensor\(s\) for 2 parameter"):
        fn(f, [x, y], [vec])
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(4,\), expected \(2, 2\) like params\[1\]") as info:
        fn(f, [x, y], [vec, torch.ones(4)])
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(TypeError, match=r"v\[0\] must be a tensor, got list"):
        fn(f, [x, y], [[1.0, 2.0, 3.0], torch.ones(2, 2)])
    with pytest.raises(TypeError, match="v must be a tensor or a list of tensors"):
        fn(f, [x, y], None)


def test_hessian_diagonal_v_checked():
    with pytest.raises(ValueError, match=r"v\[0\] has shape \(2,\), expected \(3,\)"):
        hessian_diagonal(lambda: (x ** 2).sum(), [x], v=[torch.ones(2)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        hessian_diagonal(lambda: (x ** 2).sum(), [x], v=[vec, vec])


@pytest.mark.parametrize(
    "call",
    [
        lambda n: hessian_trace(lambda: (x ** 2).sum(), [x], num_samples=n),
        lambda n: hvp_module.hessian_trace(lambda: (x ** 2).sum(), [x], num_samples=n),
        lambda n: approximate_hvp(lambda: (x ** 2).sum(), [x], vec, num_samples=n),
        lambda n: model_hessian_trace(nn.Linear(3, 1), F.mse_loss, torch.ones(2, 3), torch.ones(2, 1), num_samples=n),
    ],
)
def test_num_samples_must_be_positive_int(call):
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"num_samples must be a positive int \(>= 1\), got {bad}") as info:
            call(bad)
        assert isinstance(info.value, RuntimeError)
    with pytest.raises(TypeError, match="num_samples must be a positive int, got float"):
        call(2.5)


def test_strict_message_is_pytorchs():
    c = torch.ones(2)
    for fn in (hessian_diagonal, hessian_trace):
        with pytest.raises(RuntimeError) as info:
            fn(lambda: (x ** 2).sum() + c.sum(), [x, c], strict=True)
        assert str(info.value) == "One of the differentiated Tensors does not require grad"
    with pytest.raises(RuntimeError) as info:
        exact_hvp(lambda: (x ** 2).sum() + c.sum(), [x, c], [vec, c])
    assert str(info.value) == "One of the differentiated Tensors does not require grad"


MODEL_FNS = {
    "model_hessian_diagonal": lambda m, l, a, b: model_hessian_diagonal(m, l, a, b),
    "model_hessian_trace": lambda m, l, a, b: model_hessian_trace(m, l, a, b),
    "model_hvp": lambda m, l, a, b: model_hvp(m, l, a, b, [torch.ones(1, 3), torch.ones(1)]),
    "gauss_newton_product": lambda m, l, a, b: gauss_newton_product(m, l, a, b, [torch.ones(1, 3), torch.ones(1)]),
}


@pytest.mark.parametrize("name", MODEL_FNS)
def test_model_functions_check_model_and_loss(name):
    lin, a, b = nn.Linear(3, 1), torch.ones(2, 3), torch.ones(2, 1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function") as info:
        MODEL_FNS[name](lambda t: lin(t), F.mse_loss, a, b)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        MODEL_FNS[name](lin, "mse", a, b)
    with pytest.raises(ValueError, match=r"scalar.*shape \(2, 1\)") as info:
        MODEL_FNS[name](lin, lambda o, t: (o - t) ** 2, a, b)
    assert isinstance(info.value, RuntimeError)


def test_model_without_parameters():
    with pytest.raises(ValueError, match=r"model.parameters\(\) is empty"):
        model_hessian_trace(nn.Tanh(), F.mse_loss, torch.ones(2, 3), torch.ones(2, 3))


def test_approximate_hvp_damping_type():
    with pytest.raises(TypeError, match="damping must be a real number, got str"):
        approximate_hvp(lambda: (x ** 2).sum(), [x], vec, damping="0.1")
