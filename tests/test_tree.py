"""The pytree layer on random nested structures of tensors."""

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secorder import tree

NT = collections.namedtuple("NT", "a b")

shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
tensors = shapes.map(lambda s: torch.randn(s, dtype=torch.float64))


def containers(children):
    return st.one_of(
        st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.tuples(children, children).map(lambda t: NT(*t)),
    )


trees = st.recursive(tensors, containers, max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_ravel_roundtrip_and_sizes(t):
    flat, unravel = tree.ravel(t)
    assert flat.shape == (tree.size(t),)
    assert tree.sizes(t) == [x.numel() for x in tree.leaves(t)]
    back = unravel(flat)
    assert tree.structure(back) == tree.structure(t)
    for x, y in zip(tree.leaves(back), tree.leaves(t)):
        assert torch.equal(x, y)


@settings(max_examples=60, deadline=None)
@given(trees, st.floats(-3, 3))
def test_algebra_matches_flat_vectors(t, alpha):
    u = tree.random_like(t, "normal")
    fu, _ = tree.ravel(u)
    ft, _ = tree.ravel(t)
    if ft.numel():
        torch.testing.assert_close(tree.vdot(t, u), ft @ fu)
    torch.testing.assert_close(tree.ravel(tree.axpy(alpha, t, u))[0], alpha * ft + fu)
    torch.testing.assert_close(tree.ravel(tree.scale(t, alpha))[0], alpha * ft)
    torch.testing.assert_close(tree.ravel(tree.add(t, u))[0], ft + fu)
    torch.testing.assert_close(tree.ravel(tree.sub(t, u))[0], ft - fu)
    assert not tree.ravel(tree.zeros_like(t))[0].any()
    tree.check_like(u, t, "u")  # same structure and shapes: no error


def test_random_like_distributions_and_generator():
    t = {"w": torch.zeros(50, 40, dtype=torch.float64)}
    r1 = tree.random_like(t, generator=torch.Generator().manual_seed(3), batch_shape=(2,))
    r2 = tree.random_like(t, generator=torch.Generator().manual_seed(3), batch_shape=(2,))
    assert torch.equal(r1["w"], r2["w"]) and r1["w"].shape == (2, 50, 40)
    assert set(r1["w"].unique().tolist()) == {-1.0, 1.0}
    assert r1["w"].dtype == torch.float64
    n = tree.random_like(t, "normal")["w"]
    assert abs(float(n.mean())) < 0.15 and abs(float(n.std()) - 1) < 0.1
    with pytest.raises(ValueError, match="unknown distribution 'cauchy'; valid ones are rademacher, normal"):
        tree.random_like(t, "cauchy")


def test_paths_name_leaves():
    t = {"layer": [torch.ones(1), NT(torch.ones(1), torch.ones(1))]}
    assert tree.paths(t) == ["['layer'][0]", "['layer'][1][0]", "['layer'][1][1]"]
    assert tree.paths(torch.ones(1)) == [""]


def test_check_like_errors():
    with pytest.raises(ValueError, match="same pytree structure"):
        tree.check_like({"a": torch.ones(1)}, {"b": torch.ones(1)}, "v")
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(2,\), expected \(3,\)"):
        tree.check_like([torch.ones(1), torch.ones(2)], [torch.ones(1), torch.ones(3)], "v")
    with pytest.raises(ValueError, match="flat vector of shape"):
        tree.ravel([torch.ones(2)])[1](torch.ones(3))
