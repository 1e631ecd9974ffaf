"""Legacy ``torch_secorder.core.utils``: flatten / unflatten and parameter selection."""

import pytest
import torch
import torch.nn as nn

from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.core.utils import (
    flatten_params,
    get_param_shapes,
    get_params_by_module_type,
    get_params_by_name_pattern,
    unflatten_params,
)


def test_documented_examples_verbatim():
    # docs/api/core/utils.rst of torch-secorder 0.0.1.
    param1 = torch.randn(2, 3)
    param2 = torch.randn(5)
    params = [param1, param2]
    flat_params = flatten_params(params)
    assert flat_params.shape == (11,)
    param_shapes = get_param_shapes(params)
    assert param_shapes == [torch.Size([2, 3]), torch.Size([5])]
    unflat_params = unflatten_params(flat_params, param_shapes)
    assert unflat_params[0].shape == (2, 3) and unflat_params[1].shape == (5,)
    assert torch.equal(unflat_params[0], param1) and torch.equal(unflat_params[1], param2)

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = nn.Linear(10, 5)
            self.relu = nn.ReLU()
            self.linear2 = nn.Linear(5, 1)
            self.conv_layer = nn.Conv2d(3, 16, 3)

        def forward(self, x):
            return self.linear2(self.relu(self.linear1(x)))

    model = MyModel()
    linear = get_params_by_module_type(model, nn.Linear)
    assert list(linear) == ["linear1", "linear2"]
    assert [[p.shape for p in v] for v in linear.values()] == [[(5, 10), (5,)], [(1, 5), (1,)]]
    both = get_params_by_module_type(model, [nn.Linear, nn.Conv2d])
    assert list(both) == ["linear1", "linear2", "conv_layer"]
    assert both["conv_layer"][0] is model.conv_layer.weight

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Linear(10, 5)
            self.layer2 = nn.Linear(5, 1)

    model = Named()
    assert [p.shape for p in get_params_by_name_pattern(model, "weight")] == [(5, 10), (1, 5)]
    assert [p.shape for p in get_params_by_name_pattern(model, "layer1")] == [(5, 10), (5,)]


def test_flatten_keeps_order_graph_dtype_and_accepts_non_contiguous_and_generators():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    flat = flatten_params(p for p in [a.t(), b])          # a transpose: not contiguous
    torch.testing.assert_close(flat, torch.cat([a.t().reshape(-1), b]))
    assert flat.dtype == torch.float64 and flat.requires_grad
    (ga,) = torch.autograd.grad((flat * torch.arange(14.0, dtype=torch.float64)).sum(), [a])
    torch.testing.assert_close(ga, torch.arange(12.0, dtype=torch.float64).reshape(4, 3).t())
    model = nn.Linear(3, 2)
    assert flatten_params(model.parameters()).shape == (8,)


def test_unflatten_views_shapes_as_tuples_and_size_mismatch():
    flat = torch.arange(10.0)
    parts = unflatten_params(flat, [(2, 3), [4]])
    assert [p.shape for p in parts] == [(2, 3), (4,)]
    assert parts[0].data_ptr() == flat.data_ptr()          # views, as in 0.0.1
    with pytest.raises(LegacyValueError, match=r"flat_params has shape \(10,\).*9 entries"):
        unflatten_params(flat, [(3, 3)])                   # 0.0.1 silently dropped the extra entry
    with pytest.raises(LegacyValueError, match="flat_params has shape"):
        unflatten_params(flat.reshape(2, 5), [(10,)])
    with pytest.raises(LegacyTypeError):
        unflatten_params([1.0, 2.0], [(2,)])
    assert unflatten_params(torch.zeros(0), []) == []


def test_params_by_module_type_is_recursive_and_includes_root():
    # As in 0.0.1, a matching module contributes all its parameters, its children's included.
    inner = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model = nn.Sequential(inner, nn.Linear(1, 1))
    got = get_params_by_module_type(model, (nn.Sequential,))
    assert list(got) == ["", "0"] and len(got[""]) == 6 and len(got["0"]) == 4
    assert get_params_by_module_type(model, nn.Conv2d) == {}
    with pytest.raises(LegacyTypeError, match="module_type"):
        get_params_by_module_type(model, "Linear")
    with pytest.raises(LegacyTypeError, match="model must be a torch.nn.Module"):
        get_params_by_module_type([1], nn.Linear)


def test_params_by_name_pattern_uses_regex_search():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1)))
    assert get_params_by_name_pattern(model, r"^1\.0\.") == [model[1][0].weight, model[1][0].bias]
    assert get_params_by_name_pattern(model, "bias$") == [model[0].bias, model[1][0].bias]
    assert get_params_by_name_pattern(model, "nothing") == []
    with pytest.raises(LegacyTypeError, match="pattern"):
        get_params_by_name_pattern(model, 3)
