"""Bad input gets a clear error naming the problem, never a wrong answer."""

import collections

import pytest
import torch

import secorder as so

f_sum = lambda x: (x ** 2).sum()
TRANSFORMS = [so.hessian_diag, so.trace]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_non_scalar_output_names_shape(transform):
    with pytest.raises(ValueError, match=r"scalar.*shape \(3,\)"):
        transform(lambda x: x ** 2)(torch.ones(3))


def test_non_scalar_output_hvp():
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        so.hvp(lambda x: x.reshape(2, 3) ** 2)(torch.ones(6), torch.ones(6))


@pytest.mark.parametrize("transform", TRANSFORMS + [so.hvp])
def test_argnums_type(transform):
    with pytest.raises(TypeError, match="argnums must be an int or a tuple"):
        transform(f_sum, argnums=[0])
    with pytest.raises(TypeError, match="argnums"):
        transform(f_sum, argnums=(0, "1"))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_argnums_out_of_range(transform):
    with pytest.raises(ValueError, match=r"argnums=2 is out of range.*2 positional"):
        transform(lambda x, y: (x * y).sum(), argnums=2)(torch.ones(2), torch.ones(2))


def test_argnums_out_of_range_hvp():
    with pytest.raises(ValueError, match="argnums=1 is out of range"):
        so.hvp(f_sum, argnums=1)(torch.ones(2), torch.ones(2))


def test_v_structure_mismatch():
    with pytest.raises(ValueError, match="v must have the same pytree structure"):
        so.hvp(lambda p: (p["a"] ** 2).sum())({"a": torch.ones(2)}, [torch.ones(2)])


def test_v_shape_mismatch_names_leaf():
    with pytest.raises(ValueError, match=r"v\['a'\] has shape \(3,\), expected \(2,\)"):
        so.hvp(lambda p: (p["a"] ** 2).sum())({"a": torch.ones(2)}, {"a": torch.ones(3)})


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_leaves(transform, dtype):
    bad = Point(torch.ones(2), torch.ones(2, dtype=dtype))
    with pytest.raises(TypeError, match=rf"leaf \[1\] has dtype {dtype}.*floating-point"):
        transform(lambda p: (p.x ** 2).sum())(bad)


def test_integer_leaf_hvp():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        so.hvp(lambda x: x.sum())(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bad", [0, -3])
def test_chunk_size_non_positive(transform, bad):
    with pytest.raises(ValueError, match=rf"chunk_size must be a positive int or None, got {bad}"):
        transform(f_sum, chunk_size=bad)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_chunk_size_type(transform):
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        transform(f_sum, chunk_size=2.5)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_unknown_method_lists_valid(transform):
    with pytest.raises(ValueError, match=r"unknown method 'magic'; valid methods are 'exact'"):
        transform(f_sum, method="magic")


def test_has_aux_requires_pair():
    with pytest.raises(TypeError, match=r"\(loss, aux\) tuple"):
        so.trace(f_sum, has_aux=True)(torch.ones(2))


def test_hvp_without_tangent():
    with pytest.raises(TypeError, match="followed by the tangent v"):
        so.hvp(f_sum)(torch.ones(2))


def test_no_tensors_to_differentiate():
    with pytest.raises(ValueError, match="contain no tensors"):
        so.trace(lambda p: torch.tensor(0.0))({})
