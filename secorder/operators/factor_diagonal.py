"""Exact diagonals of ``J^T H_out J`` on any model: ``sum_n sum_k w[k, n] (J_n^T B[k, n])^2``.

With the per-sample factor of ``H_out`` (:mod:`secorder.operators.output_factor`:
``K`` columns, ``C`` for the GGN of cross-entropy, ``mc_samples`` for the
Monte-Carlo Fisher, one for the empirical Fisher), the diagonal of the GGN or a
Fisher costs ``N K`` vector-Jacobian products, not one product per parameter. It
takes one of three routes, tried in this order, and says which ran
(:attr:`FactorDiagonal.route`, shown in the transform's ``last_fallback_reason``):

1. ``"per-sample (vmap)"``: the model is run on one sample at a time under
   ``torch.func.vmap`` over the samples (each sample's inputs as a batch of one),
   its VJP ``vmap``-ed over the factor columns. About ``K`` full-batch gradients of
   work in all. Needs the batch to be splittable: the differentiated argument is
   ``params`` alone; every tensor in the inputs has the batch as its leading
   dimension; no ``BatchNorm`` in training mode; and the per-sample outputs (which
   the route computes anyway) equal the batched ones, checked on the first chunk with
   one host sync (a model whose own code mixes the samples fails it; under an outer
   ``vmap``, where nothing can be decided on the host, the full-batch route runs).
2. ``"per-sample (loop)"``: the same products, one sample at a time in a Python
   loop, where the model's code refuses ``vmap`` (Hugging Face BERT/ViT/ConvNeXt
   write in place into unbatched tensors). Not taken when the refusal is about
   randomness, or the model has a training-mode dropout (a loop would draw other
   masks than the call's one forward).
3. ``"full batch"``: the call's own full-batch VJP (its one forward pass) with one
   cotangent per (sample, column), ``B[k, n]`` on sample ``n`` and zeros elsewhere.
   Exact for any model, samples coupled or not (training-mode batch norms, dropout
   drawn once), at ``N K`` full-batch backward passes.

Memory: ``chunk_size`` (the transforms' option) bounds the (sample, column) pairs
per batched VJP; each pair holds a parameter-sized gradient (and, per sample, that
sample's activations). The default, :func:`auto_pairs`, keeps the pairs' gradients
under :data:`AUTO_ENTRIES` entries (64 MiB in float32), at most
:data:`MAX_AUTO_PAIRS` pairs.

Reference:
    Dangel, F., Kunstner, F., Hennig, P. (2020). BackPACK: Packing more into backprop. ICLR
    (the diagonal as squared factor-column products); the per-sample VJPs follow
    ``torch.func``'s per-sample-gradient recipe.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .. import tree
from ..slow_path import ColumnMonitor
from .output_factor import OutputFactor

__all__ = ["AUTO_ENTRIES", "MAX_AUTO_PAIRS", "auto_pairs", "FactorDiagonal", "split_reason"]

#: Entries of the per-pair gradients held by one batched VJP at the default chunk size.
AUTO_ENTRIES = 2 ** 24
#: Most (sample, column) pairs per batched VJP at the default chunk size.
MAX_AUTO_PAIRS = 256


def auto_pairs(num_params: int) -> int:
    """(sample, column) pairs per batched VJP for ``num_params`` differentiated entries.

    Example:
        >>> auto_pairs(100), auto_pairs(700_000), auto_pairs(10 ** 9)
        (256, 23, 1)
    """
    return max(1, min(MAX_AUTO_PAIRS, AUTO_ENTRIES // max(num_params, 1)))


def _weighted_squares(grads: List[Tensor], w: Tensor) -> List[Tensor]:
    """``sum_p w[p] g[p]**2`` for each leaf's batch of gradients ``g`` ``[P, *leaf]``."""
    return [(g * g * w.reshape((-1,) + (1,) * (g.dim() - 1))).sum(0) for g in grads]


def _done(monitor: Optional[ColumnMonitor], pairs: int) -> None:
    if monitor is not None:
        monitor.done(pairs)


def _add(acc: Optional[List[Tensor]], parts: List[Tensor]) -> List[Tensor]:
    return list(parts) if acc is None else [a + p for a, p in zip(acc, parts)]


# -- route 3: the call's full-batch VJP, one cotangent per (sample, column) -----------------------------


def full_batch(pullback: Callable[[Tensor], Any], fac: OutputFactor, out_shape: Tuple[int, ...], N: int,
               pairs: int, monitor: Optional[ColumnMonitor] = None) -> List[Tensor]:
    """The diagonal from the full-batch ``pullback`` (``u -> (J^T u,)``), ``pairs`` cotangents per batched call."""
    acc = None
    K = fac.columns
    if not fac.per_sample:
        for start in range(0, K, pairs):
            B, w = fac.columns_between(start, min(K, start + pairs))
            g = vmap(lambda u: pullback(u)[0])(B)
            acc = _add(acc, _weighted_squares(g, w))
            _done(monitor, B.shape[0])
        return acc
    for start in range(0, K * N, pairs):
        stop = min(K * N, start + pairs)
        k_lo, k_hi = start // N, (stop - 1) // N + 1
        B, w = fac.columns_between(k_lo, k_hi)
        idx = torch.arange(start, stop, device=B.device)
        k, n = idx // N - k_lo, idx % N
        U = B.new_zeros((idx.numel(),) + tuple(B.shape[1:]))
        U[torch.arange(idx.numel(), device=B.device), n] = B[k, n]
        if fac.unbatch:
            U = U[:, 0]
        g = vmap(lambda u: pullback(u.reshape(out_shape))[0])(U)
        acc = _add(acc, _weighted_squares(g, w[k, n]))
        _done(monitor, idx.numel())
    return acc


# -- routes 1 and 2: the model on one sample at a time ------------------------------------------------


def _couples_samples(model: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"module {name or '<root>'!r} ({type(m).__name__}) uses batch statistics in training mode"
    return None


def _draws_randomness(model: Any) -> Optional[str]:
    """A training-mode dropout: a loop over samples would draw other masks than the call's one forward."""
    if not isinstance(model, nn.Module):
        return None
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"module {name or '<root>'!r} ({type(m).__name__}) draws a mask in training mode"
    return None


class _Split:
    """The call's inputs split into samples: ``output(leaves, xs)`` is one sample's output (a batch of one)."""

    def __init__(self, problem: Any, N: int):
        self.problem = problem
        self.flat, self.spec = tree.flatten(problem.args[1])
        self.N = N

    def reason(self) -> Optional[str]:
        if not self.flat:
            return "the inputs hold no tensor"
        for i, x in enumerate(self.flat):
            if not isinstance(x, Tensor):
                continue
            if x.dim() == 0 or x.shape[0] != self.N:
                return (f"input leaf {tree.paths(self.problem.args[1])[i]} of shape {tuple(x.shape)} has no leading "
                        f"batch dimension of size {self.N}")
        if not any(isinstance(x, Tensor) for x in self.flat):
            return "the inputs hold no tensor"
        return None

    @property
    def batched(self) -> List[Tensor]:
        return [x for x in self.flat if isinstance(x, Tensor)]

    def output(self, leaves: List[Tensor], xs: List[Tensor]) -> Tensor:
        problem = self.problem
        it = iter(xs)
        flat = [next(it).unsqueeze(0) if isinstance(x, Tensor) else x for x in self.flat]
        inputs = tree.unflatten(self.spec, flat)
        args = problem.args_with(tree.unflatten(problem.spec, leaves))
        return problem.evaluate(lambda: problem.f.output(args[0], inputs, problem._buffers(args)))


def split_reason(problem: Any, fac: OutputFactor, N: int) -> Optional[str]:
    """Why the per-sample routes cannot run on this call (``None``: they can)."""
    if not fac.per_sample:
        return "the loss couples the samples"
    if fac.unbatch:
        return "the output has no batch dimension"
    if tuple(problem.resolved) != (0,):
        return "the differentiated arguments include more than params"
    model = problem.f.model
    if isinstance(model, nn.Module):
        found = _couples_samples(model)
        if found:
            return found
    return _Split(problem, N).reason()


def _column_vjps(pull: Callable, B: Tensor) -> List[Tensor]:
    """One sample's ``J_n^T b`` for its columns ``B`` ``[k, *feat]``: each leaf ``[k, *leaf]``.

    A single column skips the ``vmap`` (a second batching level over the whole backward pass
    costs the Fishers' one-column diagonals about a third of their time).
    """
    if B.shape[0] == 1:
        return [g.unsqueeze(0) for g in pull(B[0].unsqueeze(0))[0]]
    return vmap(lambda b: pull(b.unsqueeze(0))[0])(B)


def _one_sample(split: _Split, leaves: List[Tensor]) -> Callable:
    """``(xs, B_n [K, *feat], w_n [K]) -> (weighted squared VJPs, the sample's output)`` for one sample."""

    def one(xs: List[Tensor], Bn: Tensor, wn: Tensor) -> Tuple[List[Tensor], Tensor]:
        out_n, pull = vjp(lambda L: split.output(L, xs), leaves)
        return _weighted_squares(_column_vjps(pull, Bn), wn), out_n[0]

    return one


class _Mismatch(Exception):
    """The per-sample outputs differ from the batched ones (or cannot be compared here)."""


def _check_outputs(per: Tensor, out: Tensor) -> None:
    """Raise :class:`_Mismatch` unless ``per`` (samples run one at a time) equals ``out`` (one host sync).

    This is how a split batch proves itself: a model whose samples interact (batch statistics
    computed in its own code, a mean over the batch) gives other per-sample outputs.
    """
    eps = torch.finfo(out.dtype).eps
    try:
        ok = bool(((per - out).abs() <= 16 * eps ** 0.5 * (1 + out.abs().amax())).all())
    except RuntimeError as err:  # under an outer vmap nothing can be decided on the host
        raise _Mismatch(f"the per-sample outputs cannot be checked here ({str(err).splitlines()[0][:120]})") from None
    if not ok:
        raise _Mismatch("the model's per-sample outputs differ from its batched ones (its samples interact)")


def per_sample_vmap(split: _Split, leaves: List[Tensor], fac: OutputFactor, out: Tensor, pairs: int,
                    monitor: Optional[ColumnMonitor] = None) -> List[Tensor]:
    one = _one_sample(split, leaves)
    K, N = fac.columns, split.N
    kc = min(K, pairs)
    ns = max(1, pairs // kc)
    acc = None
    xs_all = split.batched
    for k0 in range(0, K, kc):
        B, w = fac.columns_between(k0, min(K, k0 + kc))
        for n0 in range(0, N, ns):
            xs = [x[n0:n0 + ns] for x in xs_all]
            parts, outs = vmap(one)(xs, B[:, n0:n0 + ns].transpose(0, 1), w[:, n0:n0 + ns].transpose(0, 1))
            if k0 == 0:
                _check_outputs(outs, out[n0:n0 + ns])
            acc = _add(acc, [p.sum(0) for p in parts])
            _done(monitor, B.shape[0] * xs[0].shape[0])
    return acc


def per_sample_loop(split: _Split, leaves: List[Tensor], fac: OutputFactor, out: Tensor, pairs: int,
                    monitor: Optional[ColumnMonitor] = None) -> List[Tensor]:
    K, N = fac.columns, split.N
    acc = None
    for k0 in range(0, K, pairs):
        B, w = fac.columns_between(k0, min(K, k0 + pairs))
        for n in range(N):
            xs = [x[n] for x in split.batched]
            out_n, pull = vjp(lambda L: split.output(L, xs), leaves)
            if k0 == 0:
                _check_outputs(out_n[0], out[n])
            acc = _add(acc, _weighted_squares(_column_vjps(pull, B[:, n]), w[:, n]))
            _done(monitor, B.shape[0])
    return acc


_RECOVERABLE = (RuntimeError, ValueError, NotImplementedError, TypeError, IndexError)


class FactorDiagonal:
    """The ``diagonal(chunk_size)`` of a ``J^T H_out J`` operator (routes in the module docstring).

    ``factor()`` gives the :class:`~secorder.operators.output_factor.OutputFactor`
    (or ``None``: no factor, the caller keeps its one-hot columns); ``linearization()``
    gives the call's ``(out, pullback)``. After a call, :attr:`route` says which
    route ran and why the earlier ones did not.
    """

    def __init__(self, problem: Any, factor: Callable[[], Optional[OutputFactor]],
                 linearization: Callable[[], Tuple[Any, Callable]]):
        self.problem = problem
        self.factor = factor
        self.linearization = linearization
        self.route: Optional[str] = None

    def __call__(self, chunk_size: Optional[int] = None) -> Optional[List[Tensor]]:
        fac = self.factor()
        if fac is None:
            self.route = "no output-Hessian factor for this loss and output size: one-hot columns"
            return None
        leaves = list(self.problem.leaves)
        pairs = chunk_size if chunk_size is not None else auto_pairs(sum(t.numel() for t in leaves))
        what = f"{fac.source}; (sample, column) pairs per batched VJP: {pairs}"
        out, pullback = self.linearization()
        N = 1 if fac.unbatch or out.dim() == 0 else out.shape[0]
        if fac.columns == 0 or (fac.per_sample and N == 0):
            self.route = f"empty factor ({what})"
            return [torch.zeros_like(t) for t in leaves]
        why = split_reason(self.problem, fac, N)
        split = _Split(self.problem, N)
        total = fac.columns * (N if fac.per_sample else 1)
        work = f"{total:,} vector-Jacobian products ({N} sample(s) x {fac.columns:,} factor column(s))"
        alternatives = ("method='hutchinson' (an estimate with an error bar, one product per probe), fewer samples "
                        "per batch, or a model whose batch can be split (per-sample routes)")
        with ColumnMonitor(total, "loss-factor diagonal", leaves[0].device, work=work,
                           alternatives=alternatives) as monitor:
            if why is None:
                try:
                    result = per_sample_vmap(split, leaves, fac, out, pairs, monitor)
                    self.route = f"per-sample (vmap) loss-factor VJPs ({what})"
                    return result
                except _Mismatch as err:
                    why = str(err)
                except _RECOVERABLE as err:
                    why = f"vmap over the samples failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                    random = _draws_randomness(self.problem.f.model)
                    if random is not None:
                        why = f"{why}, and {random}"
                    elif "randomness" not in str(err):
                        try:
                            result = per_sample_loop(split, leaves, fac, out, pairs, monitor)
                            self.route = f"per-sample (loop) loss-factor VJPs, as {why} ({what})"
                            return result
                        except _Mismatch as mismatch:
                            why = f"{why}, and {mismatch}"
            result = full_batch(pullback, fac, tuple(out.shape), N, pairs, monitor)
            self.route = f"full-batch loss-factor VJPs, one per (sample, column), as {why} ({what})"
        return result
