"""One pass over one batch: the K-FAC layer calls, their input factors and output-gradient factors.

:func:`batch_sums` runs the model once under the :class:`~secorder.kronecker.record.Recorder`
and backpropagates the output vectors of the ``fisher_type``
(:mod:`secorder.kronecker.columns`) in chunks of ``chunk_size`` columns (one
batched backward per chunk, ``is_grads_batched``), reading each layer's output
gradient at its recorded edge. It returns unnormalised sums (``sum x x^T`` with
its count of rows, ``sum g g^T``, the loss's reduction factor), so that batches
and ranks add up before the one normalisation of :func:`finish`:
``A = sum x x^T / rows`` and ``G = sum g g^T / (c w)`` (curvlinops 3.0.1's scaling;
``c`` the number of loss terms of a mean, 1 for a sum, ``w`` the Monte-Carlo draws).

:func:`batch_corrections` is EK-FAC's second pass: with the eigenvectors of the
final factors, the squared per-sample gradients in the Kronecker eigenbasis
(George et al. 2018), summed the same way.

Example:
    >>> import torch, secorder as so
    >>> from secorder.problem import Problem
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2))
    >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
    >>> problem = Problem(f, 0, False, (so.params_dict(model), torch.randn(5, 3), torch.randn(5, 2)))
    >>> sums = batch_sums(problem, Options("type-2", "expand"))
    >>> [layer.kind for layer in sums.layers], [tuple(G.shape) for G in sums.G]
    (['Linear', 'Linear'], [(4, 4), (2, 2)])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import tree
from ..losses import SUPPORTED_LOSSES, LossSpec, UnsupportedLoss, loss_spec
from .columns import OutputFactor, output_factor
from .layers import MAX_DENSE_EMBEDDING_FACTOR, EmbeddingRule
from .record import Recorder
from .result import LayerInfo

__all__ = ["Options", "BatchSums", "batch_sums", "batch_corrections", "probe_layers", "layer_names", "recognised_loss"]

#: Activation entries (over all layers) one chunk of backpropagated columns may hold, for the default chunk.
_AUTO_CHUNK_ENTRIES = 2**25
#: Entries of the per-sample gradients EK-FAC forms at once (per chunk of samples).
_PER_SAMPLE_ENTRIES = 2**24


@dataclass(frozen=True)
class Options:
    """The collection options (validated by the transform)."""

    fisher_type: str
    kfac_approx: str
    mc_samples: int = 1
    chunk_size: Optional[int] = None
    other: str = "error"


@dataclass
class BatchSums:
    """Unnormalised sums of one batch (module docstring; ``G`` already divided by ``w``); lists are per layer."""

    layers: List[LayerInfo]
    A: List[Optional[Tensor]]
    rows: List[int]
    G: List[Optional[Tensor]]
    c: Tensor
    calls: List[List[Any]] = field(default_factory=list)
    others: List[int] = field(default_factory=list)


def layer_names(params: Any) -> List[str]:
    """Readable leaf names: a dict key as it is (``"0.weight"``), else the pytree path.

    Example:
        >>> import torch
        >>> layer_names({"fc.weight": torch.ones(1), "w": [torch.ones(1)]})
        ['fc.weight', 'w[0]']
    """
    out = []
    for path in tree.paths(params):
        m = re.fullmatch(r"\['(.*?)'\](.*)", path)
        out.append(m.group(1) + m.group(2) if m else (path or "params"))
    return out


def _layer_name(names: Sequence[str], weight: Optional[int], bias: Optional[int]) -> str:
    leaf = names[weight] if weight is not None else names[bias]
    for suffix in (".weight", ".bias"):
        if leaf.endswith(suffix):
            return leaf[: -len(suffix)]
    return leaf


def recognised_loss(loss_fn: Any, fisher_type: str) -> LossSpec:
    """The loss's spec, or a ``ValueError`` saying that ``fisher_type`` needs a known predictive distribution."""
    try:
        return loss_spec(loss_fn)
    except UnsupportedLoss as err:
        raise UnsupportedLoss(
            f"fisher_type={fisher_type!r} needs the loss's predictive distribution (its Hessian square root, label "
            f"draws or per-sample gradients), known for {SUPPORTED_LOSSES}: {err}; fisher_type='forward-only' needs "
            "no loss") from None


def _structure(rec: Recorder, names: Sequence[str],
               other_ok: bool = False) -> Tuple[List[LayerInfo], List[List[Any]], List[int]]:
    """The layers of the recorded calls (calls of one layer grouped) and the other leaves, or a ``ValueError``.

    With ``other_ok``, leaves used only outside K-FAC layers (a ``LayerNorm``) are
    returned as the third item; a leaf of a K-FAC layer that is also used otherwise,
    and a leaf that nothing uses, are errors either way.
    """
    order: Dict[Tuple[Any, Any], int] = {}
    grouped: List[List[Any]] = []
    owner: Dict[int, Tuple[Any, Any]] = {}
    problems: List[str] = []
    for call in rec.calls:
        key = (call.weight, call.bias)
        for leaf in key:
            if leaf is not None and owner.setdefault(leaf, key) != key:
                problems.append(f"{names[leaf]} (shared by two layer calls with different partners)")
        if key not in order:
            order[key] = len(grouped)
            grouped.append([])
        first = grouped[order[key]][0] if grouped[order[key]] else None
        if first is not None and (first.rule is not call.rule or first.weight_shape != call.weight_shape):
            problems.append(f"{names[key[0] if key[0] is not None else key[1]]} (used by a {first.rule.name} and a "
                            f"{call.rule.name} call)")
        grouped[order[key]].append(call)
    covered = set(owner)
    elsewhere = sorted(set(rec.other) | set(rec.unsupported))
    others = [i for i in elsewhere if i not in covered] if other_ok else []
    for leaf in elsewhere:
        if leaf in others:
            continue
        why = [f"used by {', '.join(sorted(rec.other[leaf]))}"] if leaf in rec.other else []
        why += [rec.unsupported[leaf]] if leaf in rec.unsupported else []
        also = "also " if leaf in covered else ""
        problems.append(f"{names[leaf]} ({also}{'; '.join(why)})")
    unused = [names[i] for i in range(len(names)) if i not in covered and i not in elsewhere]
    for name in unused:
        problems.append(f"{name} (not used by the model's forward pass)")
    if problems:
        unique = list(dict.fromkeys(problems))
        hint = "" if other_ok else ", or pass other='diagonal' for the exact diagonal of those used by other layers"
        raise ValueError(
            "K-FAC covers the weights and biases of the layers that call F.linear (Linear on any input shape), "
            "F.conv1d/2d/3d (Conv1d/2d/3d) and F.embedding (Embedding); these parameters are not (only) used so: "
            + "; ".join(unique) + f". Leave them out of params (parameters not in params are constants){hint}")
    layers = []
    for key, calls in zip(order, grouped):
        call = calls[0]
        d_out, d_in = call.rule.dims(call.weight_shape)
        layers.append(LayerInfo(_layer_name(names, *key), call.rule.label(call), key[0], key[1], d_out, d_in,
                                call.rule.out_first, len(calls)))
    return layers, grouped, others


def _model_samples(problem: Any, out: Any) -> Optional[int]:
    targets = problem.targets
    if isinstance(targets, Tensor):
        return targets.shape[0] if targets.dim() else 1
    return out.shape[0] if isinstance(out, Tensor) and out.dim() else None


def _check_samples(layers: List[LayerInfo], grouped: List[List[Any]], N: Optional[int], per_sample: bool) -> None:
    """A layer must see the samples: one row per sample for EK-FAC, never one row shared by a batch (a broadcast)."""
    if N is None:
        return
    bad = []
    for info, calls in zip(layers, grouped):
        for call in calls:
            n = call.rule.samples(call)
            if (per_sample and n != N) or (n == 1 < N):
                bad.append(f"{info.name} ({info.kind} on an input of batch size {n})")
                break
    if bad:
        need = ("EK-FAC's per-sample gradients need every layer to see one row per sample" if per_sample else
                "K-FAC needs every layer to see the samples: an input shared by the whole batch (a broadcast buffer "
                "such as position ids) sums the samples' output gradients before K-FAC could factor them")
        raise ValueError(f"{need}; the batch has {N} samples but these layers see other batch sizes: "
                         f"{'; '.join(bad)}. Leave their parameters out of params")


def _forward(problem: Any, leaves: List[Tensor], names: Sequence[str], grad: bool, per_sample: bool = False,
             other_ok: bool = False):
    rec = Recorder(leaves, grad=grad)
    args = problem.args_with(tree.unflatten(problem.spec, leaves))

    def run() -> Any:
        # innermost of the torch-function modes (inside secorder.composites' mode that Problem.evaluate enters),
        # so that the recorder sees F.linear / F.conv*d / F.embedding as the model calls them
        with rec:
            return problem.f.output(args[0], args[1], problem._buffers(args))

    # Our own graph, whatever the caller's grad mode: no_grad and inference_mode are switched off here.
    with torch.inference_mode(False), (torch.enable_grad() if grad else torch.no_grad()):
        out = problem.evaluate(run)
    layers, grouped, others = _structure(rec, names, other_ok)
    _check_samples(layers, grouped, _model_samples(problem, out), per_sample)
    if grad and any(c.edge is None for calls in grouped for c in calls):
        raise RuntimeError("K-FAC: a layer output has no gradient graph (inference tensors as inputs or "
                           "parameters? create them outside torch.inference_mode)")
    return out, layers, grouped, others, rec.convolutions


def _auto_chunk(out: Tensor, grouped: List[List[Any]], count: int) -> int:
    per_column = out.numel() + sum(c.x.numel() for calls in grouped for c in calls if isinstance(c.x, Tensor))
    return max(1, min(count, _AUTO_CHUNK_ENTRIES // max(per_column, 1)))


def _backward(out: Tensor, grouped: List[List[Any]], factor: OutputFactor, chunk_size: Optional[int],
              rows: bool = True, convolutions: bool = False):
    """Yield ``(layer index, call, g)`` for every chunk of columns: ``g`` the output gradients ``[k, *y.shape]``,
    as rows ``[k, N, S, d_out]`` with ``rows=True``."""
    calls = [(i, c) for i, cs in enumerate(grouped) for c in cs]
    if not calls:
        return
    if not out.requires_grad:
        raise ValueError("the model output does not depend on the recorded layers (is it detached?)")
    K = factor.count
    if K == 0:
        return
    # PyTorch's batched (vmap) rule for a convolution's backward loops over the columns and concatenates:
    # separate backward passes are faster (2x on benchmarks/bench_kfac.py's CNN), so chunks of one there.
    step = chunk_size if chunk_size is not None else 1 if convolutions else _auto_chunk(out, grouped, K)
    edges = [c.edge for _, c in calls]
    for start in range(0, K, step):
        stop = min(K, start + step)
        cols = factor.columns(start, stop).to(out.dtype)
        batched = stop - start > 1
        grads = torch.autograd.grad([out], edges, grad_outputs=[cols if batched else cols[0]],
                                    retain_graph=stop < K, allow_unused=True, is_grads_batched=batched)
        for (i, call), g in zip(calls, grads):
            if g is None:
                continue
            g = (g if batched else g.unsqueeze(0)).detach()
            yield i, call, call.rule.output_rows(call, g) if rows else g


def _factor(problem: Any, opts: Options, generator: Optional[torch.Generator], out: Tensor) -> OutputFactor:
    spec = recognised_loss(problem.loss_fn, opts.fisher_type)
    problem.loss_of_output(out.detach())  # the loss must accept what f accepts (raises as f raises)
    return output_factor(opts.fisher_type, spec, out, problem.targets, opts.mc_samples, generator)


def probe_layers(problem: Any, other_ok: bool = False) -> Tuple[List[LayerInfo], List[int]]:
    """The K-FAC layers and other leaves of one call (a forward pass without gradients), or the error."""
    problem.require_split("kfac")
    leaves = [t.detach() for t in problem.leaves]
    _, layers, _, others, _ = _forward(problem, leaves, layer_names(problem.primals), False, other_ok=other_ok)
    return layers, others


def batch_sums(problem: Any, opts: Options, generator: Optional[torch.Generator] = None) -> BatchSums:
    """The unnormalised K-FAC sums of one call of ``f`` (module docstring).

    Args:
        problem: the call (:class:`secorder.problem.Problem` of a :class:`secorder.FunctionalLoss`).
        opts: the options.
        generator: the Monte-Carlo labels' source (``"mc"``).

    Returns:
        The :class:`BatchSums`.
    """
    problem.require_split(f"kfac (fisher_type={opts.fisher_type!r})")
    leaves = [t.detach() for t in problem.leaves]
    names = layer_names(problem.primals)
    grad = opts.fisher_type != "forward-only"
    out, layers, grouped, others, convolutions = _forward(problem, leaves, names, grad,
                                                          other_ok=opts.other == "diagonal")
    A: List[Optional[Tensor]] = [None] * len(layers)
    rows: List[int] = [0] * len(layers)
    for i, calls in enumerate(grouped):
        for call in calls:
            if call.weight is None:
                continue
            part, count = call.rule.input_factor(call, opts.kfac_approx)
            A[i] = part if A[i] is None else A[i] + part
            rows[i] += count
    G: List[Optional[Tensor]] = [None] * len(layers)
    dtype, device = leaves[0].dtype, leaves[0].device
    if not grad:
        return BatchSums(layers, A, rows, G, torch.ones((), dtype=dtype, device=device), grouped, others)
    if not isinstance(out, Tensor):
        raise TypeError(f"K-FAC needs a model output that is a tensor, got {type(out).__name__}")
    factor = _factor(problem, opts, generator, out)
    for i, call, g in _backward(out, grouped, factor, opts.chunk_size, rows=False, convolutions=convolutions):
        part = call.rule.output_factor(call, g, opts.kfac_approx)
        if factor.weight != 1:
            part = part / factor.weight
        G[i] = part if G[i] is None else G[i] + part
    for i, layer in enumerate(layers):
        if G[i] is None:
            G[i] = torch.zeros(layer.d_out, layer.d_out, dtype=dtype, device=device)
    return BatchSums(layers, A, rows, G, factor.c.to(dtype), grouped, others)


# -- EK-FAC -----------------------------------------------------------------------------------


def _rotate(M: Tensor, Q: Optional[Tensor]) -> Tensor:
    return M if Q is None else M @ Q


def _weight_correction(call: Any, Gt: Tensor, QA: Optional[Tensor]) -> Tensor:
    """``sum_{k,n} (Q_G^T (sum_s g x^T) Q_A)^2`` as ``[d_out, d_in]``."""
    rule = call.rule
    if isinstance(rule, EmbeddingRule) and QA is None:
        return _embedding_correction(call, Gt).T
    X = rule.features(call)
    if isinstance(rule, EmbeddingRule) and X.numel() > MAX_DENSE_EMBEDDING_FACTOR:
        raise ValueError("EK-FAC of an Embedding in kfac_approx='reduce' would form one-hot inputs of "
                         f"{X.numel()} entries; use kfac_approx='expand'")
    Xt = _rotate(X.to(Gt.dtype), QA)  # [N, S, d_in]
    K, N, S, d_out = Gt.shape
    d_in = Xt.shape[-1]
    if S == 1:
        return (Gt[:, :, 0] ** 2).sum(0).T @ (Xt[:, 0] ** 2)
    pairs_G = Gt.reshape(K * N, S, d_out)
    total = Gt.new_zeros(d_out, d_in)
    step = max(1, _PER_SAMPLE_ENTRIES // max(d_out * d_in, 1))
    for start in range(0, K * N, step):
        stop = min(K * N, start + step)
        n = torch.arange(start, stop, device=Gt.device) % N
        per_sample = pairs_G[start:stop].mT @ Xt[n]  # [chunk, d_out, d_in]
        total += (per_sample ** 2).sum(0)
    return total


def _embedding_correction(call: Any, Gt: Tensor) -> Tensor:
    """An Embedding's ``[V, D]`` correction: per sample and token, the summed rotated gradients, squared."""
    rule = call.rule
    idx = rule.indices(call).long()
    N, S = idx.shape
    V = call.weight_shape[0]
    keep = rule.kept(call, idx).reshape(-1)
    keys = (torch.arange(N, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    out = Gt.new_zeros(V, Gt.shape[-1])
    for k in range(Gt.shape[0]):
        rows = Gt[k].reshape(N * S, Gt.shape[-1]) * keep.unsqueeze(-1).to(Gt.dtype)
        summed = Gt.new_zeros(unique.numel(), Gt.shape[-1]).index_add_(0, inverse, rows)
        out.index_add_(0, unique % V, summed ** 2)
    return out


def _rows_per_sample(problem: Any, out: Tensor) -> int:
    """Loss rows per sample: positions of ``[N, C, *d]`` logits (cross-entropy), middle dims of ``[N, *, C]``."""
    if out.dim() <= 2:
        return 1
    spec = loss_spec(problem.loss_fn)
    return math.prod(out.shape[2:]) if spec.kind == "ce" else math.prod(out.shape[1:-1])


def batch_corrections(problem: Any, opts: Options, bases: Sequence[Tuple[Optional[Tensor], Tensor]],
                      generator: Optional[torch.Generator] = None) -> Tuple[List[Optional[Tensor]],
                                                                             List[Optional[Tensor]], Tensor]:
    """EK-FAC's unnormalised corrected eigenvalues of one call (module docstring).

    Args:
        problem: the call.
        opts: the options.
        bases: per layer ``(QA, QG)`` (``QA`` ``None``: the identity, a diagonal ``A``).
        generator: the labels' source (the same draws as the factors' pass).

    Returns:
        ``(S_weight per layer, S_bias per layer, c)`` (divided by ``w``), weight
        corrections in the weight's 2-D view.
    """
    leaves = [t.detach() for t in problem.leaves]
    names = layer_names(problem.primals)
    out, layers, grouped, _, convolutions = _forward(problem, leaves, names, True, per_sample=True,
                                                     other_ok=opts.other == "diagonal")
    if len(layers) != len(bases):
        raise ValueError("the model called other layers in EK-FAC's second pass than in the first")
    factor = _factor(problem, opts, generator, out)
    if opts.fisher_type == "type-2" and _rows_per_sample(problem, out) > 1:
        raise ValueError(
            f"EK-FAC with fisher_type='type-2' needs one loss row per sample (outputs [N, C]; got {tuple(out.shape)}): "
            "its square-root columns, backpropagated for all rows of a sample at once, would add cross terms between "
            "the rows to the per-sample gradients. Use fisher_type='mc' (independent draws per row: no cross terms "
            "in expectation) or 'empirical' (per-sample gradients summed over the rows), or so.kfac")
    S_w: List[Optional[Tensor]] = [None] * len(layers)
    S_b: List[Optional[Tensor]] = [None] * len(layers)
    for i, call, r in _backward(out, grouped, factor, opts.chunk_size, convolutions=convolutions):
        QA, QG = bases[i]
        Gt = r @ QG  # [k, N, S, d_out] in G's eigenbasis
        if call.weight is not None:
            part = _weight_correction(call, Gt, QA) / factor.weight
            part = part if layers[i].out_first else part.T
            S_w[i] = part if S_w[i] is None else S_w[i] + part
        if call.bias is not None:
            part = (Gt.sum(2) ** 2).sum((0, 1)) / factor.weight
            S_b[i] = part if S_b[i] is None else S_b[i] + part
    dtype, device = leaves[0].dtype, leaves[0].device
    for i, layer in enumerate(layers):
        if layer.weight is not None and S_w[i] is None:
            shape = (layer.d_out, layer.d_in) if layer.out_first else (layer.d_in, layer.d_out)
            S_w[i] = torch.zeros(shape, dtype=dtype, device=device)
        if layer.bias is not None and S_b[i] is None:
            S_b[i] = torch.zeros(layer.d_out, dtype=dtype, device=device)
    return S_w, S_b, factor.c.to(dtype)
