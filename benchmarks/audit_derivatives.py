"""Audit: which PyTorch operations' higher-order or forward-mode rules are wrong or missing.

secorder differentiates ``f`` two or three times, in reverse and forward mode, and
batches its probes with ``vmap``. For every operation below (float64, small random
inputs away from kinks and ties) this script compares, for a loss
``L(x) = sum(a * y + b * y^2 + c * y^3)`` of the operation's output ``y``:

* ``grad``: the gradient against central differences of ``L``;
* ``rev2``: the reverse-over-reverse Hessian-vector product ``H v`` against
  central differences of the gradient;
* ``fwd2``: the forward-over-reverse ``H v`` (``jvp`` of ``grad``) against ``rev2``
  (PyTorch's forward-mode rule);
* ``rev3`` / ``mix3`` / ``fwd3``: the third derivative ``d/dt H(x + t u) v``: in
  reverse mode over ``rev2`` (``vjp``, contracted with ``u``: the gradient of a
  curvature penalty on secorder's operators, which are reverse-over-reverse), in
  reverse mode over ``fwd2`` (the gradient of a penalty built on ``so.hvp``), and in
  forward mode over ``fwd2`` (``jvp``), each against central differences of ``rev2``;
* ``vmap2`` / ``vmap3``: ``H v`` (both modes) and ``rev3`` for two probes at once
  under ``vmap``, against the loop;

and marks each ``ok``, ``WRONG`` (relative error above the tolerance) or ``ERROR``
(PyTorch raises). ``--composites`` runs every evaluation inside
:func:`secorder.differentiable_ops` (what secorder does) and reports as ``rev`` a
forward-mode check that ``so.hvp`` answers reverse-over-reverse instead (a missing
forward-mode rule, or one marked unsafe in :mod:`secorder.composites.forward_mode`),
so the table shows what is left after the composites.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.audit_derivatives [--composites] [--row=NAME,...] [--rst]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vjp, vmap

D = torch.float64
CHECKS = ("grad", "rev2", "fwd2", "rev3", "mix3", "fwd3", "vmap2", "vmap3")
TOL = {"grad": 1e-6, "rev2": 1e-6, "fwd2": 1e-9, "rev3": 2e-5, "mix3": 2e-5, "fwd3": 2e-5, "vmap2": 1e-9,
       "vmap3": 1e-9}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0, lo=None) -> torch.Tensor:
    t = torch.randn(*shape, dtype=D, generator=_g(seed))
    return t if lo is None else t.abs() + lo


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _cases() -> Dict[str, Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    x2, x3, x4, x5 = _r(3, 4, seed=1), _r(2, 3, 8, seed=2), _r(2, 3, 6, 6, seed=3), _r(2, 2, 4, 4, 4, seed=4)
    w4 = _r(4, 3, 3, 3, seed=5)
    cls = torch.tensor([0, 3, 1])
    probs = torch.softmax(_r(3, 4, seed=6), 1)
    pos = _r(3, 4, seed=7, lo=0.2)
    idx = torch.tensor([[0, 2, 1, 3], [3, 3, 0, 1], [1, 0, 2, 2]])
    bags = torch.tensor([0, 2, 4, 1, 4, 3, 0])
    offsets = torch.tensor([0, 3, 5])
    emb = _r(5, 3, seed=8)
    sq = _r(4, 4, seed=9)
    spd = sq @ sq.T + 4 * torch.eye(4, dtype=D)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(D).eval()
    enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, norm_first=True).to(D).eval()
    rnn = {k: m(3, 4, batch_first=True).to(D) for k, m in (("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU))}
    with_zero = x2.clone()
    with_zero[1, 2] = 0.0
    two_zeros = with_zero.clone()
    two_zeros[1, 0] = 0.0
    grid = torch.rand(2, 4, 4, 2, dtype=D, generator=_g(10)) * 1.8 - 0.9
    samples = torch.rand(2, 3, 2, dtype=D, generator=_g(11))
    theta = _r(2, 2, 3, seed=12)
    k1, kg, k3, kt = _r(4, 3, 3, seed=13), _r(3, 1, 3, 3, seed=14), _r(2, 2, 2, 2, 2, seed=15), _r(3, 2, 3, 3, seed=16)
    ln_w, ln_b, gn_w, gn_b, rms_w = _r(8, seed=18), _r(8, seed=19), _r(3, seed=20), _r(3, seed=21), _r(8, seed=22)
    bn_m, bn_v, psw = _r(3, seed=23), _r(3, seed=24, lo=0.5), _r(7, seed=25)
    sym = lambda x: 0.5 * (x + x.transpose(-1, -2))  # noqa: E731 (the symmetric matrix the solver reads)
    unique = torch.tensor([[0, 2, 1, 3], [3, 4, 0, 1], [1, 0, 2, 4]])
    c = {
        # activations
        "relu": (x2, F.relu), "leaky_relu": (x2, lambda x: F.leaky_relu(x, 0.1)), "elu": (x2, F.elu),
        "selu": (x2, F.selu), "celu": (x2, lambda x: F.celu(x, 0.7)), "gelu": (x2, F.gelu),
        "gelu_tanh": (x2, lambda x: F.gelu(x, approximate="tanh")), "silu": (x2, F.silu), "mish": (x2, F.mish),
        "softplus": (x2, lambda x: F.softplus(x, beta=2.0)), "hardtanh": (x2, lambda x: F.hardtanh(x, -0.5, 0.5)),
        "hardswish": (x2, F.hardswish), "hardsigmoid": (x2, F.hardsigmoid), "logsigmoid": (x2, F.logsigmoid),
        "softsign": (x2, F.softsign), "tanhshrink": (x2, F.tanhshrink), "sigmoid": (x2, torch.sigmoid),
        "tanh": (x2, torch.tanh), "glu": (x2, F.glu), "prelu": (x2, lambda x: F.prelu(x, torch.tensor([0.2], dtype=D))),
        "rrelu_eval": (x2, lambda x: F.rrelu(x, training=False)), "softmax": (x2, lambda x: F.softmax(x, 1)),
        "log_softmax": (x2, lambda x: F.log_softmax(x, 1)), "softmin": (x2, lambda x: F.softmin(x, 1)),
        # pooling
        "max_pool1d": (x3, lambda x: F.max_pool1d(x, 2)), "max_pool2d": (x4, lambda x: F.max_pool2d(x, 2)),
        "max_pool3d": (x5, lambda x: F.max_pool3d(x, 2)), "avg_pool1d": (x3, lambda x: F.avg_pool1d(x, 3, 2, 1)),
        "avg_pool2d": (x4, lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
        "avg_pool3d": (x5, lambda x: F.avg_pool3d(x, 2)),
        "adaptive_avg_pool2d": (x4, lambda x: F.adaptive_avg_pool2d(x, 4)),
        "adaptive_max_pool1d": (x3, lambda x: F.adaptive_max_pool1d(x, 3)),
        "adaptive_max_pool2d": (x4, lambda x: F.adaptive_max_pool2d(x, 4)),
        "adaptive_max_pool3d": (x5, lambda x: F.adaptive_max_pool3d(x, 2)),
        "lp_pool2d": (x4.abs() + 0.1, lambda x: F.lp_pool2d(x, 3, 2)),
        "fractional_max_pool2d": (x4, lambda x: F.fractional_max_pool2d(x, 2, output_size=3, _random_samples=samples)),
        "max_pool2d_channels_last": (_cl(x4), lambda x: F.max_pool2d(x, 2)),
        "max_pool3d_channels_last": (_cl(x5), lambda x: F.max_pool3d(x, 2)),
        "adaptive_max_pool2d_channels_last": (_cl(x4), lambda x: F.adaptive_max_pool2d(x, 4)),
        # convolutions
        "conv1d": (x3, lambda x: F.conv1d(x, k1, stride=2, dilation=1, padding=1)),
        "conv2d": (x4, lambda x: F.conv2d(x, w4, padding="same")),
        "conv2d_groups": (x4, lambda x: F.conv2d(x, kg, groups=3, dilation=2)),
        "conv3d": (x5, lambda x: F.conv3d(x, k3)),
        "conv_transpose2d": (x4, lambda x: F.conv_transpose2d(x, kt, stride=2)),
        "conv2d_weight": (w4, lambda w: F.conv2d(x4, w)),
        "conv2d_channels_last": (_cl(x4), lambda x: F.conv2d(x, w4)),
        "unfold": (x4, lambda x: F.unfold(x, 3, stride=2)), "fold": (_r(2, 12, 4, seed=17),
                                                                     lambda x: F.fold(x, (3, 3), 2)),
        # normalisation
        "layer_norm": (x3, lambda x: F.layer_norm(x, (8,), ln_w, ln_b)),
        "layer_norm_weight": (ln_w, lambda w: F.layer_norm(x3, (8,), w)),
        "group_norm": (x4, lambda x: F.group_norm(x, 3, gn_w, gn_b)),
        "group_norm_weight": (gn_w, lambda w: F.group_norm(x4, 3, w, gn_b)),
        "group_norm_channels_last": (_cl(x4), lambda x: F.group_norm(x, 3)),
        "rms_norm": (x3, lambda x: F.rms_norm(x, (8,), rms_w)),
        "rms_norm_weight": (rms_w, lambda w: F.rms_norm(x3, (8,), w)),
        "batch_norm_eval": (x4, lambda x: F.batch_norm(x, bn_m, bn_v)),
        "batch_norm_train_weight": (gn_w, lambda w: F.batch_norm(x4, None, None, w, gn_b, training=True)),
        "batch_norm_train": (x4, lambda x: F.batch_norm(x, None, None, training=True)),
        "instance_norm": (x4, lambda x: F.instance_norm(x)),
        "local_response_norm": (x4, lambda x: F.local_response_norm(x, 2)),
        "normalize": (x2, lambda x: F.normalize(x, dim=1)),
        # embeddings
        "embedding_padding_idx": (emb, lambda w: F.embedding(idx, w, padding_idx=0)),
        "embedding_bag_sum": (emb, lambda w: F.embedding_bag(bags, w, offsets, mode="sum")),
        "embedding_bag_mean": (emb, lambda w: F.embedding_bag(bags, w, offsets, mode="mean")),
        "embedding_bag_max": (emb, lambda w: F.embedding_bag(bags, w, offsets, mode="max")),
        "embedding_bag_padding_idx": (emb, lambda w: F.embedding_bag(bags, w, offsets, mode="sum", padding_idx=0)),
        "embedding_bag_per_sample_weights": (
            emb, lambda w: F.embedding_bag(bags, w, offsets, mode="sum", per_sample_weights=psw)),
        "embedding_bag_weights_wrt_psw": (
            psw, lambda p: F.embedding_bag(bags, emb, offsets, mode="sum", per_sample_weights=p)),
        # losses (the output is the loss)
        "cross_entropy": (x2, lambda x: F.cross_entropy(x, cls)),
        "cross_entropy_weight_smoothing": (
            x2, lambda x: F.cross_entropy(x, torch.tensor([0, -100, 1]), weight=pos[0], label_smoothing=0.2)),
        "cross_entropy_probs": (x2, lambda x: F.cross_entropy(x, probs, label_smoothing=0.1)),
        "nll_loss": (x2, lambda x: F.nll_loss(F.log_softmax(x, 1), cls, weight=pos[1])),
        "mse_loss": (x2, lambda x: F.mse_loss(x, probs)), "l1_loss": (x2, lambda x: F.l1_loss(x, probs)),
        "smooth_l1_loss": (x2, lambda x: F.smooth_l1_loss(x, probs, beta=0.5)),
        "huber_loss": (x2, lambda x: F.huber_loss(x, probs, delta=0.5)),
        "binary_cross_entropy": (x2, lambda x: F.binary_cross_entropy(torch.sigmoid(x), probs, weight=pos)),
        "bce_with_logits": (x2, lambda x: F.binary_cross_entropy_with_logits(x, probs, pos_weight=pos[0])),
        "kl_div": (x2, lambda x: F.kl_div(F.log_softmax(x, 1), probs, reduction="batchmean")),
        "kl_div_log_target": (x2, lambda x: F.kl_div(F.log_softmax(x, 1), probs.log(), log_target=True)),
        "poisson_nll_loss": (x2, lambda x: F.poisson_nll_loss(x, pos)),
        "gaussian_nll_loss": (x2, lambda x: F.gaussian_nll_loss(x, probs, pos)),
        "gaussian_nll_loss_var": (pos, lambda v: F.gaussian_nll_loss(x2, probs, v)),
        "cosine_embedding_loss": (x2, lambda x: F.cosine_embedding_loss(x, probs, torch.tensor([1, -1, 1]))),
        "margin_ranking_loss": (x2, lambda x: F.margin_ranking_loss(x, probs, torch.ones(3, 4, dtype=D))),
        "multi_margin_loss": (x2, lambda x: F.multi_margin_loss(x, cls, p=2)),
        "multilabel_soft_margin_loss": (x2, lambda x: F.multilabel_soft_margin_loss(x, (probs > 0.25).to(D))),
        "soft_margin_loss": (x2, lambda x: F.soft_margin_loss(x, torch.sign(probs - 0.25))),
        "triplet_margin_loss": (x2, lambda x: F.triplet_margin_loss(x, probs, pos, margin=3.0)),
        # interpolation and resampling
        "interpolate_nearest": (x4, lambda x: F.interpolate(x, scale_factor=2)),
        "interpolate_bilinear": (x4, lambda x: F.interpolate(x, size=(7, 5), mode="bilinear")),
        "interpolate_bilinear_aligned": (x4, lambda x: F.interpolate(x, size=(7, 5), mode="bilinear",
                                                                     align_corners=True)),
        "interpolate_bicubic": (x4, lambda x: F.interpolate(x, size=(7, 5), mode="bicubic")),
        "interpolate_linear": (x3, lambda x: F.interpolate(x, size=11, mode="linear")),
        "interpolate_trilinear": (x5, lambda x: F.interpolate(x, size=(3, 5, 6), mode="trilinear")),
        "interpolate_area": (x4, lambda x: F.interpolate(x, size=(4, 4), mode="area")),
        "grid_sample_bilinear": (x4, lambda x: F.grid_sample(x, grid, align_corners=False)),
        "grid_sample_grid": (grid, lambda gr: F.grid_sample(x4, gr, align_corners=False)),
        "grid_sample_bicubic": (x4, lambda x: F.grid_sample(x, grid, mode="bicubic", align_corners=False)),
        "affine_grid": (theta, lambda t: F.affine_grid(t, (2, 1, 3, 4), align_corners=False)),
        "pixel_shuffle": (_r(2, 4, 3, 3, seed=26), lambda x: F.pixel_shuffle(x, 2)),
        "pad_reflect": (x4, lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")),
        "pad_replicate": (x4, lambda x: F.pad(x, (1, 2, 2, 1), mode="replicate")),
        "pad_circular": (x4, lambda x: F.pad(x, (1, 2, 2, 1), mode="circular")),
        # scans and products
        "cumsum": (x2, lambda x: torch.cumsum(x, 1)), "cumprod": (x2, lambda x: torch.cumprod(x, 1)),
        "cumprod_zero": (with_zero, lambda x: torch.cumprod(x, 1)),
        "prod": (x2, lambda x: torch.prod(x, 1)), "prod_zero": (with_zero, lambda x: torch.prod(x, 1)),
        "prod_two_zeros": (two_zeros, lambda x: torch.prod(x, 1)),
        "prod_all_zero": (with_zero, lambda x: torch.prod(x)),
        "logcumsumexp": (x2, lambda x: torch.logcumsumexp(x, 1)),
        "cummax": (x2, lambda x: torch.cummax(x, 1)[0]),
        # norms and distances
        "vector_norm_2": (x2, lambda x: torch.linalg.vector_norm(x, dim=1)),
        "vector_norm_1": (x2, lambda x: torch.linalg.vector_norm(x, 1, dim=1)),
        "vector_norm_3": (x2, lambda x: torch.linalg.vector_norm(x, 3, dim=1)),
        "vector_norm_inf": (x2, lambda x: torch.linalg.vector_norm(x, math.inf, dim=1)),
        "vector_norm_0.5": (x2, lambda x: torch.linalg.vector_norm(x, 0.5, dim=1)),
        "matrix_norm_fro": (sq, lambda x: torch.linalg.matrix_norm(x)),
        "matrix_norm_nuc": (sq, lambda x: torch.linalg.matrix_norm(x, "nuc")),
        "matrix_norm_2": (sq, lambda x: torch.linalg.matrix_norm(x, 2)),
        "torch_norm": (x2, lambda x: torch.norm(x, dim=1)), "dist": (x2, lambda x: torch.dist(x, probs, 3)),
        "cdist": (x2, lambda x: torch.cdist(x, probs)), "cdist_p1": (x2, lambda x: torch.cdist(x, probs, p=1)),
        "pdist": (x2, lambda x: F.pdist(x)), "cosine_similarity": (x2, lambda x: F.cosine_similarity(x, probs)),
        "pairwise_distance": (x2, lambda x: F.pairwise_distance(x, probs)),
        "std": (x2, lambda x: x.std(1)), "var": (x2, lambda x: x.var(0)), "logsumexp": (x2, lambda x: x.logsumexp(1)),
        "amax": (x2, lambda x: x.amax(1)), "max_dim": (x2, lambda x: x.max(1)[0]),
        "median": (x2, lambda x: x.median(1)[0]), "kthvalue": (x2, lambda x: x.kthvalue(2, 1)[0]),
        "sort": (x2, lambda x: x.sort(1)[0]), "topk": (x2, lambda x: x.topk(2, 1)[0]),
        "quantile": (x2, lambda x: torch.quantile(x, 0.3, dim=1)),
        # selection and indexing
        "where": (x2, lambda x: torch.where(x > 0, x**2, torch.sin(x))),
        "masked_fill": (x2, lambda x: x.masked_fill(x > 0.5, 0.0)),
        "masked_scatter": (x2, lambda x: probs.masked_scatter(probs > 0.25, x)),
        "index_select": (x2, lambda x: x.index_select(1, torch.tensor([3, 0, 0]))),
        "gather": (x2, lambda x: x.gather(1, idx)),
        "scatter_src": (x2, lambda x: torch.zeros(3, 5, dtype=D).scatter(1, unique, x)),
        "scatter_add": (x2, lambda x: probs.scatter_add(1, idx, x)),
        "scatter_reduce_prod": (x2, lambda x: pos.scatter_reduce(1, idx, x, "prod")),
        "scatter_reduce_amax": (x2, lambda x: pos.scatter_reduce(1, idx, x, "amax", include_self=False)),
        "scatter_reduce_mean": (x2, lambda x: pos.scatter_reduce(1, idx, x, "mean")),
        "index_add": (x2, lambda x: probs.index_add(0, torch.tensor([2, 0, 2]), x)),
        "index_put_accumulate": (x2, lambda x: torch.zeros(4, 4, dtype=D).index_put(
            (torch.tensor([0, 3, 0]),), x, accumulate=True)),
        "index_copy": (x2, lambda x: probs.index_copy(0, torch.tensor([2, 0, 1]), x)),
        "take": (x2, lambda x: x.take(torch.tensor([0, 5, 5, 11]))),
        "take_along_dim": (x2, lambda x: x.take_along_dim(idx, 1)),
        "advanced_index_assign": (x2, lambda x: torch.zeros(4, 4, dtype=D).index_put((cls,), x)),
        # linear algebra
        "det": (sq, torch.linalg.det), "slogdet": (sq, lambda x: torch.linalg.slogdet(x)[1]),
        "inv": (sq, torch.linalg.inv), "solve": (sq, lambda x: torch.linalg.solve(x, probs.T)),
        "cholesky": (spd, lambda x: torch.linalg.cholesky(sym(x))),
        "eigvalsh": (spd, lambda x: torch.linalg.eigvalsh(sym(x))),
        "eigh_vectors": (spd, lambda x: torch.linalg.eigh(sym(x))[1].abs()), "svdvals": (sq, torch.linalg.svdvals),
        "pinv": (x2, torch.linalg.pinv), "matrix_exp": (0.3 * sq, torch.linalg.matrix_exp),
        "qr": (sq, lambda x: torch.linalg.qr(x)[1]), "lu_factor": (sq, lambda x: torch.linalg.lu_factor(x)[0]),
        "cross": (x2[:, :3], lambda x: torch.linalg.cross(x, probs[:, :3])),
        # elementwise special functions
        "atan2": (x2, lambda x: torch.atan2(x, probs + 0.1)), "pow_tensor": (pos, lambda x: x ** probs),
        "pow_base": (probs, lambda e: pos**e), "clamp_tensor": (x2, lambda x: x.clamp(probs - 1, probs)),
        "rsqrt": (pos, torch.rsqrt), "erf": (x2, torch.erf), "erfinv": (probs, torch.erfinv),
        "lgamma": (pos, torch.lgamma), "digamma": (pos, torch.digamma),
        "polygamma": (pos, lambda x: torch.polygamma(1, x)), "xlogy": (pos, lambda x: torch.xlogy(x, x)),
        "sinc": (x2, torch.sinc), "hypot": (x2, lambda x: torch.hypot(x, probs)),
        "logaddexp": (x2, lambda x: torch.logaddexp(x, probs)), "logit": (probs, torch.logit),
        "lerp": (x2, lambda x: torch.lerp(x, probs, pos)), "lerp_weight": (probs, lambda w: torch.lerp(x2, pos, w)),
        "addcdiv": (x2, lambda x: torch.addcdiv(x, x, pos, value=0.5)), "i0": (x2, torch.i0),
        "special_i1": (x2, torch.special.i1), "ndtri": (probs, torch.special.ndtri),
        "log_ndtr": (x2, torch.special.log_ndtr), "fmod": (pos, lambda x: torch.fmod(x, 0.7)),
        "abs": (x2, torch.abs), "complex_abs": (x2, lambda x: torch.complex(x, probs).abs()),
        # attention, recurrent layers
        "multihead_attention": (_r(2, 3, 4, seed=27), lambda x: mha(x, x, x, need_weights=False)[0]),
        "multihead_attention_weights": (_r(2, 3, 4, seed=27), lambda x: mha(x, x, x)[0]),
        "transformer_encoder_layer": (_r(2, 3, 4, seed=28), enc),
        **{name: (_r(2, 3, 3, seed=29), lambda x, m=m: m(x)[0]) for name, m in rnn.items()},
    }
    return c


def _loss(op):
    def loss(x):
        y = op(x)
        n = y.numel()
        a = torch.linspace(-1.0, 1.0, n, dtype=D).reshape(y.shape)
        b = torch.linspace(0.5, -0.3, n, dtype=D).reshape(y.shape)
        return (a * y + b * y * y + 0.1 * y * y * y).sum()

    return loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) / scale


#: Differences from central differences that are PyTorch's definition, not an error.
BY_DESIGN = {("embedding_padding_idx", "grad"): "by design (the padding row is a constant)"}


def audit(name: str, x: torch.Tensor, op: Callable, routed: bool = False) -> Dict[str, str]:
    """The checks of one operation; with ``routed``, a forward-mode failure that ``so.hvp`` turns into
    reverse-over-reverse is reported as ``rev`` (secorder's route), not as a finding."""
    loss = _loss(op)
    v = torch.randn(x.shape, dtype=D, generator=_g(100)).contiguous(memory_format=_fmt(x))
    u = torch.randn(x.shape, dtype=D, generator=_g(101)).contiguous(memory_format=_fmt(x))
    out: Dict[str, str] = {}

    def run(key, fn):
        try:
            err = fn()
            out[key] = "ok" if err <= TOL[key] else f"WRONG {err:.1e}"
        except Exception as exc:  # noqa: BLE001 (an audit: every failure is a finding)
            if routed and key in ("fwd2", "mix3", "fwd3") and _falls_back(exc):
                out[key] = "rev"
            else:
                out[key] = "ERROR " + type(exc).__name__ + ": " + str(exc).split("\n")[0][:60]
        if out[key] != "ok" and (name, key) in BY_DESIGN:
            out[key] = BY_DESIGN[(name, key)]

    g = grad(loss)
    hv_rev = lambda x: vjp(g, x)[1](v)[0]
    hv_fwd = lambda x: jvp(g, (x,), (v,))[1]

    def grad_check():
        e = 1e-6
        fd = (loss(x + e * v) - loss(x - e * v)) / (2 * e)
        return _rel((g(x) * v).sum()[None], fd[None])

    run("grad", grad_check)
    run("rev2", lambda: _rel(hv_rev(x), (g(x + 1e-5 * v) - g(x - 1e-5 * v)) / 2e-5))
    run("fwd2", lambda: _rel(hv_fwd(x), hv_rev(x)))
    central = lambda e: (hv_rev(x + e * u) - hv_rev(x - e * u)) / (2 * e)  # noqa: E731

    def near(ad: torch.Tensor) -> float:
        """The error against the closest of three difference quotients (steps 1e-4 and 1e-5, and a
        Richardson extrapolation): each trades truncation against rounding differently, and functions
        with large higher derivatives (logit near 0 or 1) need the small step."""
        a, b = central(1e-4), central(1e-5)
        return min(_rel(ad, a), _rel(ad, b), _rel(ad, (4 * central(5e-4) - central(1e-3)) / 3))
    # u^T d(Hv)/dx equals d(Hv)/dx u: the third-derivative tensor is symmetric
    run("rev3", lambda: near(vjp(hv_rev, x)[1](u)[0]))
    run("mix3", lambda: near(vjp(hv_fwd, x)[1](u)[0]))
    run("fwd3", lambda: near(jvp(hv_fwd, (x,), (u,))[1]))
    V = torch.stack([v, u])

    def vmap2():
        errs = []
        for make in (lambda t: vjp(g, x)[1](t)[0], lambda t: jvp(g, (x,), (t,))[1]):
            errs.append(_rel(vmap(make)(V), torch.stack([make(v), make(u)])))
        return max(errs)

    def vmap3():
        third = lambda t: vjp(hv_rev, x)[1](t)[0]
        return _rel(vmap(third)(V), torch.stack([third(v), third(u)]))

    if routed and out["fwd2"] == "rev":
        out["vmap2"] = "rev" if vmap2_rev(g, x, V) <= TOL["vmap2"] else "WRONG"
    else:
        run("vmap2", vmap2)
    run("vmap3", vmap3)
    return out


def _falls_back(exc: Exception) -> bool:
    from secorder.transforms.products import _forward_ad_missing

    return _forward_ad_missing(exc)


def vmap2_rev(g, x, V) -> float:
    make = lambda t: vjp(g, x)[1](t)[0]  # noqa: E731
    return _rel(vmap(make)(V), torch.stack([make(t) for t in V]))


def _fmt(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _compact(cell: str) -> str:
    if cell in ("ok", "rev") or cell.startswith("by design"):
        return "" if cell == "ok" else cell.split(" (")[0]
    if cell.startswith("WRONG"):
        return "nan" if "nan" in cell else "wrong " + cell.split()[-1]
    return "error"


def _remaining(result: Dict[str, str]) -> str:
    left = [f"{k} {_compact(v)}" for k, v in result.items() if _compact(v) not in ("", "rev", "by design")]
    return ", ".join(left) if left else "ok"


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--composites", action="store_true", help="evaluate inside secorder.differentiable_ops()")
    parser.add_argument("--row", default=None, help="comma-separated case names")
    parser.add_argument("--rst", action="store_true",
                        help="an rst list-table of PyTorch's findings and what is left with secorder (both runs)")
    parser.add_argument("--all", action="store_true", help="list every case, not only the findings")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cases = _cases()
    if args.row:
        cases = {k: cases[k] for k in args.row.split(",")}
    import secorder

    runs = [False, True] if args.rst else [args.composites]
    table = []
    for name, (x, op) in cases.items():
        results = []
        for routed in runs:
            with (secorder.differentiable_ops() if routed else contextlib.nullcontext()):
                results.append(audit(name, x, op, routed=routed))
        shown = results[-1] if not args.rst else results[0]
        if args.all or any(_compact(v) not in ("", "rev", "by design") for v in shown.values()):
            table.append((name, results))
            if not args.rst:
                print(f"{name:36s} " + "  ".join(f"{k}={shown[k]}" for k in CHECKS), flush=True)
    print(f"# {len(cases)} operations, {len(table)} with a finding", file=sys.stderr)
    if args.rst:
        print(".. list-table::\n   :header-rows: 1\n\n   * - operation\n" + "".join(f"     - {k}\n" for k in CHECKS)
              + "     - with secorder\n")
        for name, (native, routed) in table:
            print(f"   * - ``{name}``\n" + "".join(f"     - {_compact(native[k]) or 'ok'}\n" for k in CHECKS)
                  + f"     - {_remaining(routed)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
