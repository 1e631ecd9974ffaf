"""secorder.sample_keys: counter-based draws keyed by sample content, and the keyed Monte-Carlo labels.

Distribution checks use fixed seeds and bounds of five standard deviations of the estimator.
"""

import math

import torch

from secorder.losses import LossSpec, sample_output_gradients
from secorder.sample_keys import SampleKeys

DT = torch.float64


def _keys(n=4000, seed=0):
    return SampleKeys.of(torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(1)), seed)


def test_uniforms_and_normals_have_their_moments():
    u = _keys().uniforms(4000, 5, 2).flatten()
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) <= 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) <= 5 * math.sqrt(1 / 180 / n)  # var of (u - 1/2)^2 is 1/80 - 1/144
    z = _keys(seed=1).normals(4000, 5, 2).flatten()
    assert abs(float(z.mean())) <= 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) <= 5 * math.sqrt(2 / n)
    # different draws and columns are uncorrelated
    w = _keys(seed=2).uniforms(4000, 2, 2)
    corr = torch.corrcoef(torch.stack([w[0, :, 0], w[1, :, 0], w[0, :, 1]]))
    assert (corr - torch.eye(3, dtype=corr.dtype)).abs().max() <= 5 / math.sqrt(4000)


def test_keys_depend_on_content_and_seed_not_on_order_or_batching():
    x = torch.randn(6, 2, 3, dtype=DT)
    ids = torch.randint(0, 9, (6, 4))
    keys = SampleKeys.of({"x": x, "ids": ids}, seed=5).keys
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(SampleKeys.of({"x": x[perm], "ids": ids[perm]}, seed=5).keys, keys[perm])
    assert torch.equal(SampleKeys.of({"x": x[:2], "ids": ids[:2]}, seed=5).keys, keys[:2])
    assert not torch.equal(SampleKeys.of({"x": x, "ids": ids}, seed=6).keys, keys)
    twice = torch.cat([x[:1], x[:1]])
    k = SampleKeys.of(twice, seed=0).keys
    assert k[0] == k[1]  # identical samples: identical streams
    nudged = x.clone()
    nudged[0, 1, 2] = torch.nextafter(nudged[0, 1, 2], torch.tensor(2.0, dtype=DT))
    assert SampleKeys.of(nudged, seed=0).keys[0] != SampleKeys.of(x, seed=0).keys[0]  # one ulp changes the key


def test_output_rows_map_onto_samples():
    keys = SampleKeys.of(torch.arange(6.0).reshape(3, 2), seed=0)
    per_token = keys.uniforms(rows=12, per_row=1, draws=1)[0, :, 0]  # 4 rows (tokens) per sample
    first = SampleKeys.of(torch.arange(6.0).reshape(3, 2)[:1], seed=0).uniforms(rows=4, per_row=1, draws=1)[0, :, 0]
    assert torch.equal(per_token[:4], first)
    assert len(set(per_token.tolist())) == 12
    odd = keys.uniforms(rows=5, per_row=1, draws=1)  # not a multiple: keyed by the whole batch
    assert odd.shape == (1, 5, 1) and len(set(odd.flatten().tolist())) == 5


def test_keyed_cross_entropy_labels_follow_the_predictive_distribution():
    n, C = 6000, 3
    logits = torch.tensor([0.5, -1.0, 1.2], dtype=DT).expand(n, C)
    p = torch.softmax(logits[0], 0)
    G = sample_output_gradients(LossSpec("ce", "mean"), logits, torch.zeros(n, dtype=torch.long), 2, _keys(n))
    labels = (p - G).argmax(-1)  # g = p - onehot(label)
    freq = torch.stack([(labels == c).to(DT).mean() for c in range(C)])
    assert ((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / (2 * n))).all()


def test_keyed_mse_and_bce_draws_have_the_predictive_moments():
    n = 6000
    out = torch.zeros(n, 2, dtype=DT)
    g = sample_output_gradients(LossSpec("mse", "mean"), out, out, 1, _keys(n))  # 2 e, e ~ N(0, 1/2)
    assert abs(float((g**2).mean()) - 2.0) <= 5 * math.sqrt(8.0 / g.numel())
    logits = torch.full((n, 1), 0.7, dtype=DT)
    b = torch.sigmoid(logits) - sample_output_gradients(LossSpec("bce", "mean"), logits, logits, 1, _keys(n))
    q = float(torch.sigmoid(torch.tensor(0.7)))
    assert abs(float(b.mean()) - q) <= 5 * math.sqrt(q * (1 - q) / n)
