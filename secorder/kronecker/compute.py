"""From one call (or one data set) to a :class:`~secorder.kronecker.result.KroneckerCurvature`.

:func:`compute` is what ``so.kfac(f)(*args)`` and ``so.ekfac(f)(*args)`` run:

1. the sums of :func:`~secorder.kronecker.collect.batch_sums` for the call, or
   for every batch of a data-set loss (:func:`secorder.dataset_loss`), added up
   over the batches and the ranks of its process group with one reduction
   (:meth:`secorder.dataset.DatasetLoss.reduce`), so that a data set gives what
   one big batch gives;
2. one normalisation: ``A = sum x x^T / rows``, ``G = (sum g g^T / w) / c`` with ``c``
   the number of loss terms of a mean over the whole data set (1 for a sum);
3. for EK-FAC, a second pass (:func:`~secorder.kronecker.collect.batch_corrections`)
   with the eigenvectors of those factors and the same Monte-Carlo labels.

Monte-Carlo labels: one seed is drawn from the call's generator (``seed=`` /
``generator=``, else the global RNG) and each pass draws from a generator seeded
with it; a data set's labels are keyed by the seed and each sample's content, as for
``curvature="fisher"`` (:class:`secorder.sample_keys.SampleKeys`). Both EK-FAC passes
see the same labels.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Linear(3, 2)
    >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
    >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    >>> F = so.dataset_loss(f, [(x[:6], y[:6]), (x[6:], y[6:])])
    >>> params = so.params_dict(model)
    >>> torch.allclose(so.kfac(F)(params).to_dense(), so.kfac(f)(params, x, y).to_dense(), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..dataset import Batch, DatasetLoss, is_dataset_loss
from ..problem import Problem
from .blocks import factor_eigh
from .collect import Options, _layer_name, batch_corrections, batch_sums, layer_names, probe_layers
from .result import KroneckerCurvature, Layer, LayerInfo

__all__ = ["compute"]


def _pass_generators(generator: Optional[torch.Generator], device: torch.device, fisher_type: str) -> Callable:
    """A function giving each pass its own, identical generator of Monte-Carlo labels."""
    if fisher_type != "mc":
        return lambda: None
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device if generator else "cpu"))
    return lambda: torch.Generator(device=device).manual_seed(seed)


def _normalise(layers: Sequence[LayerInfo], A: Sequence[Optional[Tensor]], rows: Sequence[Any],
               G: Sequence[Optional[Tensor]], scale: Tensor, fisher_type: str) -> List[Tuple[Any, Any]]:
    out = []
    for info, a, r, g in zip(layers, A, rows, G):
        if a is not None:  # our own buffers (fresh sums): divided in place
            r = r if isinstance(r, Tensor) else torch.tensor(float(r), dtype=a.dtype, device=a.device)
            a = a.div_(r.clamp_min(1).to(a.dtype))
        if fisher_type == "forward-only":
            g = torch.ones(info.d_out, dtype=scale.dtype, device=scale.device)  # the identity, as a diagonal
        else:
            g = g.div_(scale.to(g.dtype))
        out.append((a, g))
    return out


def _bases(factors: Sequence[Tuple[Any, Any]]) -> List[Tuple[Optional[Tensor], Tensor]]:
    out = []
    for a, g in factors:
        QA = None if a is None else factor_eigh(a, g)[1]
        out.append((QA, factor_eigh(g, g)[1]))
    return out


def _result(problem: Problem, layers: Sequence[LayerInfo], factors: Sequence[Tuple[Any, Any]],
            corrections: Optional[Tuple[Sequence[Any], Sequence[Any], Sequence[Any]]], info: dict,
            names: Sequence[str]) -> KroneckerCurvature:
    out = []
    for k, (layer, (a, g)) in enumerate(zip(layers, factors)):
        if corrections is None:
            out.append(Layer(layer, A=a, G=g))
        else:
            bases, S_w, S_b = corrections
            QA, QG = bases[k]
            out.append(Layer(layer, A=a, G=g, QA=QA, QG=QG, S_weight=S_w[k], S_bias=S_b[k], eigen_form=True))
    return KroneckerCurvature(out, problem.spec, [tuple(t.shape) for t in problem.leaves], names, info)


def _single(problem: Problem, opts: Options, ekfac: bool, generator: Optional[torch.Generator]):
    device = problem.leaves[0].device
    pass_generator = _pass_generators(generator, device, opts.fisher_type)
    sums = batch_sums(problem, opts, pass_generator())
    scale = sums.c
    factors = _normalise(sums.layers, sums.A, sums.rows, sums.G, scale, opts.fisher_type)
    corrections = None
    if ekfac:
        bases = _bases(factors)
        S_w, S_b, scale = batch_corrections(problem, opts, bases, pass_generator())
        corrections = (bases, [None if s is None else s / scale for s in S_w],
                       [None if s is None else s / scale for s in S_b])
    return sums.layers, factors, corrections, sums.others


def _first_batch(F: DatasetLoss, device: torch.device) -> Optional[Batch]:
    passes = F.batches(device, "K-FAC: the layers")
    try:
        for batch in passes:
            return batch
        return None
    finally:
        passes.close()  # the pass (and its progress) ends here, at its first batch


_FIELDS_PER_LEAF = 8  # role, layer, d_out, d_in, kind, out_first, calls, (unused)


def _kinds() -> List[str]:
    from .layers import RULES

    return sorted({rule.name for _, rule in RULES.items()})


def _shared_layers(F: DatasetLoss, local: Optional[Tuple[List[LayerInfo], List[int]]], names: Sequence[str],
                   num_leaves: int) -> Tuple[List[LayerInfo], List[int]]:
    """The layers found on this rank's first batch, or (a rank without batches) on the first rank that has one.

    With a process group the structure travels in the handshake: per leaf its role
    (weight, bias, other), layer and dimensions, as integers.
    """
    if F.group is None:
        if local is None:
            raise ValueError("data is empty: it gave no batches")
        return local
    kinds = _kinds()
    values = [0] * (1 + _FIELDS_PER_LEAF * num_leaves)
    if local is not None:
        layers, others = local
        values[0] = 1
        for k, info in enumerate(layers):
            for role, leaf in ((1, info.weight), (2, info.bias)):
                if leaf is not None:
                    values[1 + _FIELDS_PER_LEAF * leaf: 1 + _FIELDS_PER_LEAF * (leaf + 1)] = [
                        role, k, info.d_out, info.d_in, kinds.index(info.kind), int(info.out_first), info.calls, 0]
        for leaf in others:
            values[1 + _FIELDS_PER_LEAF * leaf] = 3
    gathered = F.group.handshake("K-FAC layers", values)
    source = next((row for row in gathered if row[0] == 1), None)
    if source is None:
        raise ValueError("data is empty on every rank of process_group: no batches")
    found: dict = {}
    others = []
    for leaf in range(num_leaves):
        role, k, d_out, d_in, kind, out_first, calls, _ = source[1 + _FIELDS_PER_LEAF * leaf:
                                                                1 + _FIELDS_PER_LEAF * (leaf + 1)]
        if role == 3:
            others.append(leaf)
        elif role in (1, 2):
            entry = found.setdefault(k, dict(weight=None, bias=None, d_out=d_out, d_in=d_in, kind=kinds[kind],
                                             out_first=bool(out_first), calls=calls))
            entry["weight" if role == 1 else "bias"] = leaf
    layers = [LayerInfo(_layer_name(names, e["weight"], e["bias"]), e["kind"], e["weight"], e["bias"], e["d_out"],
                        e["d_in"], e["out_first"], e["calls"]) for _, e in sorted(found.items())]
    return layers, others


def _dataset(problem: Problem, opts: Options, ekfac: bool, generator: Optional[torch.Generator]):
    F: DatasetLoss = problem.f
    params = problem.args[0]
    leaves = list(problem.leaves)
    device, dtype = leaves[0].device, leaves[0].dtype
    what = f"{'ekfac' if ekfac else 'kfac'} (fisher_type={opts.fisher_type!r}, kfac_approx={opts.kfac_approx!r})"
    call = F.prepare(params, what, offsets=opts.fisher_type == "mc")
    labels = F.label_generators(F.shared_generator(generator, device), device)[0] \
        if opts.fisher_type == "mc" else None

    def batch_problem(batch: Batch) -> Problem:
        return Problem(F.f, 0, False, (params, batch.inputs, batch.targets))

    def gen(batch: Batch) -> Any:
        return labels(batch) if labels is not None else None  # SampleKeys: labels keyed by each sample

    first = _first_batch(F, device)
    local = None if first is None else probe_layers(batch_problem(first), opts.other == "diagonal")
    layers, others = _shared_layers(F, local, layer_names(params), len(leaves))

    def templates() -> List[Tensor]:
        out = []
        for info in layers:
            diagonal = not info.out_first and opts.kfac_approx == "expand"  # an Embedding's token counts
            shape = (0,) if info.weight is None else (info.d_in,) if diagonal else (info.d_in, info.d_in)
            out.append(torch.zeros(shape, dtype=dtype, device=device))
        out += [torch.zeros((), dtype=dtype, device=device) for _ in layers]
        if opts.fisher_type != "forward-only":
            out += [torch.zeros(i.d_out, i.d_out, dtype=dtype, device=device) for i in layers]
        out.append(torch.zeros((), dtype=dtype, device=device))
        return out

    def contribute(batch: Batch) -> List[Tensor]:
        sums = batch_sums(batch_problem(batch), opts, gen(batch))
        if [(i.name, i.kind, i.weight, i.bias, i.d_out, i.d_in) for i in sums.layers] != \
                [(i.name, i.kind, i.weight, i.bias, i.d_out, i.d_in) for i in layers]:
            raise ValueError(f"data: batch {batch.index} calls other layers than the first batch")
        parts = [torch.zeros(0, dtype=dtype, device=device) if a is None else a for a in sums.A]
        parts += [torch.tensor(float(r), dtype=dtype, device=device) for r in sums.rows]
        if opts.fisher_type != "forward-only":
            parts += list(sums.G)
        parts.append(torch.as_tensor(batch.count, dtype=dtype, device=device).reshape(()))
        return parts

    n = len(layers)
    total = F.reduce(templates(), contribute, f"K-FAC factors ({opts.fisher_type})", raw=True, call=call)
    A = [None if info.weight is None else total[k] for k, info in enumerate(layers)]
    rows = total[n:2 * n]
    G = total[2 * n:3 * n] if opts.fisher_type != "forward-only" else [None] * n
    scale = _data_scale(F, total[-1])
    factors = _normalise(layers, A, rows, G, scale, opts.fisher_type)
    corrections = None
    if ekfac:
        bases = _bases(factors)

        def correct(batch: Batch) -> List[Tensor]:
            S_w, S_b, _ = batch_corrections(batch_problem(batch), opts, bases, gen(batch))
            return [torch.zeros(0, dtype=dtype, device=device) if s is None else s for s in S_w + S_b]

        temps = []
        for info in layers:
            shape = (info.d_out, info.d_in) if info.out_first else (info.d_in, info.d_out)
            temps.append(torch.zeros(shape if info.weight is not None else (0,), dtype=dtype, device=device))
        for info in layers:
            temps.append(torch.zeros(info.d_out if info.bias is not None else 0, dtype=dtype, device=device))
        got = F.reduce(temps, correct, "EK-FAC eigenvalue corrections", raw=True, call=call)
        S_w = [None if info.weight is None else got[k] / scale for k, info in enumerate(layers)]
        S_b = [None if info.bias is None else got[n + k] / scale for k, info in enumerate(layers)]
        corrections = (bases, S_w, S_b)
    return layers, factors, corrections, others


def _data_scale(F: DatasetLoss, count: Tensor) -> Tensor:
    """``c`` of the data set: the number of loss terms of its mean (``num_data`` when given), 1 for a sum."""
    if F.reduction == "sum":
        return torch.ones_like(count)
    if F.num_data is not None:
        return torch.full_like(count, float(F.num_data))
    return count.clamp_min(1)


def compute(f: Any, args: tuple, kwargs: dict, opts: Options, *, ekfac: bool,
            generator: Optional[torch.Generator], info: dict) -> KroneckerCurvature:
    """``K`` for one call of ``f`` (module docstring).

    Args:
        f: a :class:`secorder.FunctionalLoss` or a data-set loss of one.
        args: the call's positional arguments (``params`` first).
        kwargs: its keyword arguments (``buffers``).
        opts: the collection options.
        ekfac: EK-FAC (a second pass) instead of K-FAC.
        generator: the call's generator for Monte-Carlo labels (``None``: the global RNG).
        info: how ``K`` was computed (kept on it).

    Returns:
        The :class:`KroneckerCurvature`.
    """
    problem = Problem(f, 0, False, args, kwargs)
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in problem.leaves):
        raise NotImplementedError(
            "K-FAC runs outside torch.func transforms (vmap, grad, ...): it reads each layer's output gradient from "
            "autograd's graph, and its factors are not differentiated; call it once per set of parameters (a "
            "Python loop over an ensemble) instead")
    names = layer_names(problem.primals)
    if is_dataset_loss(f):
        if kwargs:
            raise TypeError(f"a data-set loss takes the parameters alone, got keyword argument(s) {sorted(kwargs)}")
        layers, factors, corrections, others = _dataset(problem, opts, ekfac, generator)
    else:
        layers, factors, corrections, others = _single(problem, opts, ekfac, generator)
    K = _result(problem, layers, factors, corrections, info, names)
    if others:
        extra = _other_layers(problem, others, names, opts, ekfac, generator)
        K = KroneckerCurvature(list(K.layers) + extra, problem.spec, [tuple(t.shape) for t in problem.leaves], names,
                               info)
    return K


#: The exact curvature whose diagonal ``other="diagonal"`` takes for each ``fisher_type``.
OTHER_CURVATURE = {"type-2": "ggn", "mc": "fisher", "empirical": "empirical_fisher"}


def _other_layers(problem: Problem, others: Sequence[int], names: Sequence[str], opts: Options, ekfac: bool,
                  generator: Optional[torch.Generator]) -> List[Layer]:
    """``other="diagonal"``: the exact diagonal of the matching curvature for the leaves outside K-FAC layers.

    The other leaves are differentiated, the K-FAC leaves held at their values, through
    the operator layer (:func:`secorder.operators.make_operator`, one-hot block
    products: as many as those leaves have entries, ``chunk_size``-d), over the data
    set when there is one. Each leaf becomes a one-block pseudo-layer whose ``G`` is
    its diagonal (``kind`` says which curvature).
    """
    from .. import tree
    from ..dataset import dataset_loss
    from ..estimators.exact import exact_diagonal
    from ..modules import FunctionalLoss
    from ..operators import make_operator

    curvature = OTHER_CURVATURE[opts.fisher_type]
    f = problem.f
    per_batch = f.f if is_dataset_loss(f) else f
    fixed = [t.detach() for t in problem.leaves]
    buffers = None if is_dataset_loss(f) else problem._buffers(problem.args)

    def model(sub: List[Tensor], inputs: Any) -> Any:
        merged = list(fixed)
        for i, t in zip(others, sub):
            merged[i] = t
        return per_batch.output(tree.unflatten(problem.spec, merged), inputs, buffers)

    g = FunctionalLoss(model, per_batch.loss_fn)
    sub = [fixed[i] for i in others]
    if is_dataset_loss(f):
        G = dataset_loss(g, f.data, reduction=f.reduction, num_data=f.num_data, progress=f.progress,
                         process_group=f.process_group)
        sub_problem = Problem(G, 0, False, (sub,))
    else:
        sub_problem = Problem(g, 0, False, (sub, problem.args[1], problem.args[2]))
    op = make_operator(curvature, sub_problem, mc_samples=opts.mc_samples, generator=generator)
    diagonals = exact_diagonal(op, opts.chunk_size)
    out = []
    for i, d in zip(others, diagonals):
        d = d.reshape(-1)
        info = LayerInfo(names[i], f"diagonal ({curvature})", None, i, d.numel(), 0, True, 0)
        if ekfac:
            out.append(Layer(info, G=d, S_bias=d, eigen_form=True))
        else:
            out.append(Layer(info, G=d))
    return out
