"""A loss over a whole data set: ``so.dataset_loss(f, data)`` is ``F(params)``, and every transform takes it.

``F = so.dataset_loss(f, data)`` turns a per-batch loss ``f(params, inputs, targets)``
and a re-iterable ``data`` of ``(inputs, targets)`` batches into a loss of the
parameters alone. Every transform accepts ``F`` (``so.hvp``, the curvature
products, ``so.trace``, ``so.diagonal`` and their estimates for every method and
curvature, ``so.eigenvalues``, ``so.spectral_density``) and returns what the same
call returns on one batch holding all the data, with memory bounded by one batch
times the probe chunk. A curvature product is a sum over batches: every batch is
visited once per block of probes, all probes of the block together
(:mod:`secorder.operators.dataset`); the structured engine visits each batch once
for an exact diagonal or trace (:mod:`secorder.structured.dataset`).

**Weights.** ``F`` is the mean (``reduction="mean"``) or the sum (``"sum"``) of the
per-term losses over the data set, whatever ``f``'s own reduction. Each batch
counts with the number of terms its loss averages over:

* for the losses whose mean's denominator secorder knows (``f`` from
  :func:`secorder.functional_loss` with PyTorch's losses, as modules or functions:
  :mod:`secorder.term_counts`), the count PyTorch's mean divides by: for
  cross-entropy and NLL with class targets the targets that are not
  ``ignore_index``, each counting its class weight when there are class weights
  (label smoothing changes nothing), so a batch of padding tokens weighs nothing
  and ``F`` is exactly what one big batch would give; samples times positions for
  probability targets of ``[N, C, *d]`` logits; every element for elementwise
  losses (MSE, L1, Huber, BCE, ...); the samples for ``KLDivLoss(reduction=
  "batchmean")``; a loss with ``reduction="sum"`` is taken as the batch's sum;
* for any other ``f``, the number of samples (the leading dimension of the
  targets), and ``f`` is taken to return the batch mean, or, with
  ``batch_reduction="sum"``, the batch's sum (then ``num_data`` is the mean's
  denominator). Where that cannot be right, integer targets with negative
  (ignored) entries, a batch is refused with a message rather than weighted by
  its size; a loss with class weights written as a plain function (a ``lambda``
  calling ``F.cross_entropy(..., weight=w)``) cannot be seen through: pass the
  loss itself (``nn.CrossEntropyLoss(weight=w)``) to :func:`secorder.functional_loss`.

So ``F(params) = (1/N) sum_b n_b f_b(params)`` for per-batch means ``f_b`` and
counts ``n_b``, ``N = sum_b n_b`` (``num_data`` when given); with
``reduction="sum"``, ``F = sum_b n_b f_b``.

**Distributed.** With ``process_group=`` (a ``torch.distributed`` group, such as
``torch.distributed.group.WORLD``) every rank passes its own shard of the data and
the same parameters; each pass over the data ends in one all-reduce of its
partial sums (and of the counts, so ``N`` is summed over the ranks), whatever the
number of batches of each rank, and every rank gets the same result, equal to the
single-process result on the union of the shards (rank 0's batches first). The
probes and the Monte-Carlo Fisher's labels are identical on every rank (seeded, or
drawn on rank 0 and broadcast: :mod:`secorder.distributed`). Every call opens with
a handshake that checks that the ranks pass parameters of the same names, shapes
and dtypes and call the same thing, and waits at most
:data:`secorder.distributed.HANDSHAKE_TIMEOUT`; an error on one rank during a
pass (a bad batch) is raised on every rank instead of leaving the others waiting.

**Randomness.** The Monte-Carlo Fisher (``curvature="fisher"``) draws one seed
from the call's generator (``seed=``/``generator=``, else the global RNG) and each
sample's labels from a stream keyed by that seed and the sample's content
(:mod:`secorder.sample_keys`): every pass, every rank and both engines see the
same labels, whatever the batching and the order of the batches (a shuffling
``DataLoader`` gives the same Fisher on every call, and the same as one big
batch). The data must otherwise give the same samples on every pass: random
augmentation, or training-mode dropout/BatchNorm make every pass a different
function; ``check_deterministic=True`` compares two passes.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Linear(3, 1)
    >>> f = so.functional_loss(model, torch.nn.MSELoss())
    >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
    >>> F = so.dataset_loss(f, [(x[:4], y[:4]), (x[4:], y[4:])])
    >>> params = so.params_dict(model)
    >>> torch.allclose(F(params), f(params, x, y))
    True
    >>> torch.allclose(so.trace(F)(params), so.trace(f)(params, x, y))
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import distributed, shards, tree
from . import progress as _progress
from .modules import FunctionalLoss
from .sample_keys import SampleKeys
from .term_counts import Terms, term_counter

__all__ = ["dataset_loss", "DatasetLoss", "Pass", "is_dataset_loss", "check_call_arguments", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")
BATCH_REDUCTIONS = (None, "mean", "sum")

_NONDETERMINISTIC_CAUSES = (
    "likely causes: a shuffling DataLoader (shuffle=True or a random sampler: with drop_last or BatchNorm batch "
    "statistics the batches themselves change), random data augmentation drawn on every pass, or a model in "
    "training mode (dropout masks, BatchNorm batch statistics); call model.eval() and iterate in a fixed order"
)


class Pass:
    """One call's passes over the data: what :meth:`DatasetLoss.prepare` opens and every pass of the call reads.

    Kept by the caller, not on the loss, so that two calls of one data-set loss at
    once (two threads) never mix their batch offsets or batch counts.

    Attributes:
        offset: the position of this rank's first batch in the union of the shards.
        expected: the number of batches every pass of the call must give (``None``
            until the first pass, or the handshake, has counted them).
    """

    __slots__ = ("offset", "expected")

    def __init__(self, offset: int = 0, expected: Optional[int] = None):
        self.offset = offset
        self.expected = expected


class Batch(NamedTuple):
    """One batch of a pass, on the parameters' device, with its weight.

    Fields:
        index: its position in the data set (the union of the shards, rank 0's first).
        inputs: the inputs, as ``f`` takes them.
        targets: the targets.
        count: the number of terms of the batch's mean (an int, or a 0-dim tensor
            for cross-entropy with class targets: a sum of class weights with them).
        scale: what ``f``'s value (and its derivatives) on the batch is multiplied
            by to give the batch's sum: ``count``, or 1 for a sum-reduced loss.
    """

    index: int
    inputs: Any
    targets: Any
    count: Any
    scale: Any


def _nothing() -> None:
    pass


def _advance_global_rng() -> None:
    torch.randint(0, 2**62, ())


def is_dataset_loss(f: Any) -> bool:
    """Whether ``f`` is a data-set loss (the one question the transforms and operators ask).

    Example:
        >>> is_dataset_loss(lambda p: p), is_dataset_loss(dataset_loss(lambda p, x, y: x.sum(), [(1, 2)]))
        (False, True)
    """
    return isinstance(f, DatasetLoss)


def check_call_arguments(args: tuple, kwargs: dict) -> None:
    """Raise the ``TypeError`` of ``F(params, x)``: a data-set loss takes the parameters alone.

    Every transform of ``F`` calls this, so that an extra argument (which ``F``
    would refuse) is not silently dropped.

    Example:
        >>> check_call_arguments((1, 2), {})
        Traceback (most recent call last):
        ...
        TypeError: a data-set loss takes the parameters alone, F(params) (its batches come from data); got 2 positional arguments
    """
    if len(args) != 1:
        raise TypeError("a data-set loss takes the parameters alone, F(params) (its batches come from data); "
                        f"got {len(args)} positional argument{'s' if len(args) != 1 else ''}")
    if kwargs:
        raise TypeError(f"a data-set loss takes the parameters alone, got keyword argument(s) {sorted(kwargs)}")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _looks_like_one_batch(data: Any) -> bool:
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not isinstance(data[1], Tensor):
        return False
    first = data[0]
    return isinstance(first, Tensor) or (isinstance(first, dict) and all(isinstance(v, Tensor) for v in first.values()))


def _iterable(data: Any) -> bool:
    """Whether ``iter(data)`` would work, asked without calling it: calling it may use up the one pass
    of an iterable that can be iterated only once (then its first real pass must say so, not "empty")."""
    cls = type(data)
    if getattr(cls, "__iter__", None) is not None:
        return True
    return getattr(cls, "__getitem__", None) is not None  # the sequence protocol


def _check_data(data: Any, distributed_run: bool) -> None:
    if isinstance(data, Tensor):
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got {_describe(data)}")
    if _looks_like_one_batch(data):
        raise TypeError("data looks like one batch (inputs, targets); pass an iterable of batches, "
                        "for example [(inputs, targets)]")
    if isinstance(data, (str, bytes, dict)):
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got a {type(data).__name__}")
    if not _iterable(data):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches (a list, a DataLoader, ...), "
            f"got a {type(data).__name__}")
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}): it would be exhausted after one pass, and every "
            "curvature product is a pass over the data; pass a list of batches, a DataLoader or another "
            "iterable that can be iterated again")
    if not distributed_run:
        try:
            n = len(data)
        except TypeError:
            return
        if n == 0:
            raise ValueError("data is empty: it has no batches")


def _check_batch_reduction(batch_reduction: Any) -> None:
    if batch_reduction is not None and not isinstance(batch_reduction, str):
        raise TypeError(f"batch_reduction must be None, 'mean' or 'sum', got {type(batch_reduction).__name__}")
    if batch_reduction not in BATCH_REDUCTIONS:
        raise ValueError(f"batch_reduction must be None, 'mean' or 'sum', got {batch_reduction!r}")


def _check_count_arg(num_data: Any, reduction: str) -> None:
    if num_data is None:
        return
    if isinstance(num_data, bool) or not isinstance(num_data, int):
        raise TypeError(f"num_data must be an int or None, got {type(num_data).__name__}")
    if num_data < 1:
        raise ValueError(f"num_data must be at least 1, got {num_data}")
    if reduction != "mean":
        raise ValueError("num_data is what the mean divides by; it does not apply to reduction='sum'")


def _term_counter(f: Any, batch_reduction: Optional[str]):
    """The counter of a batch's terms for ``f``'s loss (:mod:`secorder.term_counts`), or ``None`` if unknown.

    A known loss's own reduction must agree with ``batch_reduction`` when that is given.
    """
    counter = term_counter(f.loss_fn) if isinstance(f, FunctionalLoss) else None
    if counter is not None and batch_reduction is not None:
        own = "mean" if counter.reduction == "samples" else counter.reduction
        if own != batch_reduction:
            raise ValueError(f"batch_reduction={batch_reduction!r}, but f's loss is a {own} over its terms: "
                             "leave batch_reduction=None for a loss secorder knows (secorder.term_counts)")
    return counter


def _unknown_terms(i: int, targets: Any, samples: int, batch_reduction: Optional[str]) -> Terms:
    """The terms of a batch of a loss whose mean's denominator secorder does not know (``f`` as a black box).

    ``batch_reduction="sum"``: the value is the batch's sum (``num_data`` gives the mean's
    denominator). Otherwise ``f`` is taken to be the mean over the samples, except where
    that cannot be right: integer targets with negative entries are ignored targets
    (``ignore_index=-100``) of a mean that counts only the others, so the batch is refused
    instead of weighted by its size.
    """
    if batch_reduction == "sum":
        return Terms(samples, 1)
    if batch_reduction is None and isinstance(targets, Tensor) and not targets.is_floating_point() \
            and not targets.is_complex() and targets.dtype != torch.bool and bool((targets < 0).any()):
        raise ValueError(
            f"data: batch {i} has integer targets with negative entries (ignored targets, such as -100?) and f's loss "
            "is not one whose number of terms secorder knows, so weighting the batch by its number of samples "
            "would not give the loss of one big batch. Build f with so.functional_loss(model, loss) and a loss "
            "secorder counts (nn.CrossEntropyLoss, nn.NLLLoss, F.cross_entropy, ...: secorder.term_counts), or "
            "make f return the batch's sum and pass batch_reduction='sum' with num_data=<number of terms>; "
            "batch_reduction='mean' declares f a mean over the samples")
    return Terms(samples, samples)


def _same_batch(leaf: Tensor, samples: int, structured: bool) -> bool:
    """Whether an input ``leaf`` fits targets with ``samples`` entries in their leading dimension.

    The same leading dimension; or tokens flattened into the targets' batch
    (inputs ``[N, T, ...]``, targets ``[N * T, ...]``, as a language model's loss
    over all its tokens takes them); or, in a dict or tuple of inputs, a leading
    dimension of 1 that broadcasts (``position_ids`` of shape ``[1, T]``).

    Example:
        >>> _same_batch(torch.zeros(2, 4), 8, False), _same_batch(torch.zeros(1, 4), 8, True)
        (True, True)
        >>> _same_batch(torch.zeros(3, 4), 8, True)
        False
    """
    n = leaf.shape[0]
    return (n == samples or (leaf.dim() >= 2 and n * leaf.shape[1] == samples)
            or (structured and n == 1))


def _plain(*tensors: Tensor) -> bool:
    """Whether nothing differentiates or batches through ``tensors`` (so our own buffers may be updated in place)."""
    return not any(t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _accumulate(acc: Tensor, part: Tensor, scale: Any = None) -> Tensor:
    """``acc + scale * part`` (``scale`` ``None``: 1), in place where :func:`_plain` allows: one buffer, one sweep.

    Example:
        >>> _accumulate(torch.ones(2), torch.ones(2), torch.tensor(3))
        tensor([4., 4.])
    """
    if _plain(acc, part) and acc.shape == part.shape and acc.dtype == part.dtype:
        if scale is None:
            return acc.add_(part)
        if isinstance(scale, Tensor):
            return acc.addcmul_(part, scale)
        return acc.add_(part, alpha=scale)
    return acc + (part if scale is None else part * scale)


class DatasetLoss:
    """A loss over a whole data set, ``F(params)``: made by :func:`dataset_loss` (see the module docstring).

    Attributes:
        f: the per-batch loss ``f(params, inputs, targets)``.
        data: the batches.
        reduction: ``"mean"`` or ``"sum"``.
        num_data: the mean's denominator when given (else the counted terms).
        batch_reduction: what ``f`` returns on a batch, when declared (``"mean"`` or ``"sum"``).
        progress: the progress-bar setting.
        check_deterministic: whether the first use compares two passes.
        process_group: the ``torch.distributed`` group, or ``None``.

    Example:
        >>> import torch, secorder as so
        >>> f = lambda w, x, y: ((x @ w - y) ** 2).mean()
        >>> x, y = torch.arange(8.).reshape(4, 2), torch.ones(4)
        >>> F = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])   # batches of 3 and 1
        >>> isinstance(F, so.DatasetLoss), torch.allclose(F(torch.ones(2)), f(torch.ones(2), x, y))
        (True, True)
    """

    def __init__(
        self,
        f: Callable[..., Any],
        data: Iterable[Any],
        *,
        reduction: str = "mean",
        num_data: Optional[int] = None,
        progress: Optional[bool] = None,
        check_deterministic: bool = False,
        process_group: Any = None,
        batch_reduction: Optional[str] = None,
    ):
        if not callable(f):
            raise TypeError(f"f must be callable as f(params, inputs, targets), got {type(f).__name__}")
        if is_dataset_loss(f):
            raise TypeError("f is already a data-set loss; pass its per-batch loss (F.f)")
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be 'mean' or 'sum', got {type(reduction).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _check_count_arg(num_data, reduction)
        _check_batch_reduction(batch_reduction)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
        if not isinstance(check_deterministic, bool):
            raise TypeError(f"check_deterministic must be a bool, got {type(check_deterministic).__name__}")
        self.group = distributed.resolve(process_group)
        _check_data(data, self.group is not None)
        self._group_warned = False
        if self.group is None:
            self._warn_default_group(stacklevel=4)
        self.f = f
        self.data = data
        self.reduction = reduction
        self.num_data = num_data
        self.progress = progress
        self.check_deterministic = check_deterministic
        self.process_group = process_group
        self.batch_reduction = batch_reduction
        self._count_terms = _term_counter(f, batch_reduction)
        if self._count_terms is None and batch_reduction == "sum" and reduction == "mean" and num_data is None:
            raise ValueError("batch_reduction='sum' with reduction='mean' needs num_data (the number of terms the "
                             "mean divides by): f's loss is not one whose terms secorder can count")
        self._checked = not check_deterministic
        self._reductions = 0
        self._warned = False
        self._seen = 0  # batches of the last complete pass

    def __repr__(self) -> str:
        where = "" if self.group is None else f", ranks={self.group.size}"
        return f"dataset_loss({self.f!r}, {type(self.data).__name__}, reduction={self.reduction!r}{where})"

    # -- what users call ---------------------------------------------------------------

    def __call__(self, params: Any) -> Tensor:
        """The loss over the data set at ``params`` (one pass).

        Differentiable in eager autograd (then it keeps every batch's graph until the
        backward pass: use :meth:`value_and_grad` for the gradient with the memory of
        one batch).
        """
        leaves = self._leaves(params)
        layout = shards.layout_of(params, self.group)
        if layout is not None:  # FSDP2 shards: gathered once, the value computed on full tensors
            with shards.gathering(layout, params, getattr(self.f, "model", None)) as full:
                return self(full)
        if self.group is None and not self._warned and any(
                torch._C._functorch.is_functorch_wrapped_tensor(t) for t in leaves):
            self._warned = True
            warnings.warn(
                "a data-set loss is being differentiated as a plain function (torch.func around F(params), or a "
                "function calling F): that keeps every batch's graph in memory at once; pass F itself to the "
                "secorder transforms (one batch at a time), or use F.value_and_grad(params)", stacklevel=2)
        call = self.prepare(params, "the loss")
        zero = torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device)
        return self.reduce([zero], lambda b: [self._batch_value(params, b)], "loss", call=call)[0]

    def value_and_grad(self, params: Any) -> Tuple[Tensor, Any]:
        """The loss and its gradient over the data set at ``params``, in one pass with the memory of one batch.

        Args:
            params: the parameters, as ``f`` takes them.

        Returns:
            ``(loss, grad)`` with ``grad`` shaped like ``params``.

        Example:
            >>> import torch, secorder as so
            >>> f = lambda w, x, y: ((x @ w - y) ** 2).mean()
            >>> x, y = torch.randn(6, 2), torch.randn(6)
            >>> F = so.dataset_loss(f, [(x[:4], y[:4]), (x[4:], y[4:])])
            >>> value, g = F.value_and_grad(torch.zeros(2))
            >>> torch.allclose(g, torch.func.grad(f)(torch.zeros(2), x, y))
            True
        """
        self._leaves(params)
        layout = shards.layout_of(params, self.group)
        if layout is not None:  # FSDP2 shards: gathered once; the gradient given back sharded like params
            with shards.gathering(layout, params, getattr(self.f, "model", None)) as full:
                value, grad = self.value_and_grad(full)
            leaves, spec = tree.flatten(grad)
            return value, tree.unflatten(spec, layout.export_all(leaves))
        return self._value_and_grad(params, self.prepare(params, "the loss and its gradient"))

    # -- what the operator layer and the structured engine call ---------------------------

    def _warn_default_group(self, stacklevel: int) -> None:
        """Warn once when ``torch.distributed`` runs several ranks but this loss has no process group."""
        if self._group_warned:
            return
        warning = distributed.default_group_warning()
        if warning is not None:
            self._group_warned = True
            warnings.warn(warning, stacklevel=stacklevel)

    def prepare(self, params: Any, what: str, *, offsets: bool = False) -> Pass:
        """Open a call: the handshake of the ranks, batch offsets, and the determinism check on first use.

        Args:
            params: the parameters of the call.
            what: what the call computes (part of the handshake: every rank must agree).
            offsets: whether batch positions in the union of the shards are needed
                (the Fisher's labels), which takes every rank's number of batches.

        Returns:
            The call's :class:`Pass`, for every :meth:`reduce` of the call (within a
            call every pass must give the same batches; between calls data may change).
        """
        call = Pass()
        if self.group is None:  # made before init_process_group (group.WORLD was None then), used after it
            self._warn_default_group(stacklevel=5)
        if self.group is not None:
            leaves, spec = tree.flatten(params)
            names = tree.paths(params)
            signature = (
                f"{what}; reduction={self.reduction}, num_data={self.num_data}; parameters "
                + ", ".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in zip(names, leaves))
            )
            local = [self._local_batches(call)] if offsets else []
            gathered = self.group.handshake(signature, local)
            if offsets:
                call.offset = sum(row[0] for row in gathered[: self.group.rank])
                if sum(row[0] for row in gathered) == 0:
                    raise ValueError("data is empty on every rank of process_group: no batches")
        if not self._checked:
            self._check_deterministic(params)
            self._checked = True
        return call

    def label_generators(self, generator: Optional[torch.Generator], device: torch.device, *,
                         deferred: bool = False):
        """The sources of the Monte-Carlo Fisher's labels per batch, and a function that undoes the draw.

        One seed is drawn from ``generator`` (from the global RNG when ``None``, in
        one process; with a process group, the call's generator is first made
        identical on every rank); each sample's labels are keyed by that seed and
        the sample's content (:class:`secorder.sample_keys.SampleKeys`), so they do
        not depend on which batch the sample is in or on the order of the batches (a
        shuffling ``DataLoader``).

        ``deferred=True`` is for a path that may decline (the structured engine): it
        also returns ``undo()``, which puts ``generator`` back as it was, and
        ``commit()``, to be called once the path ran. The global RNG is never rewound
        (other threads draw from it): without a generator the seed is read from a copy
        of its state, and ``commit()`` advances it by that one draw.

        Returns:
            ``(labels_of(batch), undo)``; ``(labels_of(batch), undo, commit)`` with ``deferred``.
        """
        if generator is None and self.group is not None:
            generator = self.group.shared_generator(None, device)

        commit = _nothing
        if generator is not None:
            state = generator.get_state()
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))

            def undo() -> None:
                generator.set_state(state)
        else:
            if deferred:
                peek = torch.Generator()
                peek.set_state(torch.get_rng_state())
                seed = int(torch.randint(0, 2**62, (), generator=peek))
                commit = _advance_global_rng  # by the draw read from the copy
            else:
                seed = int(torch.randint(0, 2**62, ()))
            undo = _nothing

        def labels_of(batch: Batch) -> SampleKeys:
            return SampleKeys.of(batch.inputs, seed)

        return (labels_of, undo, commit) if deferred else (labels_of, undo)

    def shared_generator(self, generator: Optional[torch.Generator], device: torch.device):
        """The call's generator: unchanged in one process; identical on every rank with a process group."""
        if self.group is None:
            return generator
        return self.group.shared_generator(generator, device)

    def reduce(
        self,
        templates: Sequence[Tensor],
        contribute: Callable[[Batch], Sequence[Tensor]],
        what: str,
        *,
        decline: Tuple[type, ...] = (),
        raw: bool = False,
        call: Optional[Pass] = None,
    ) -> List[Tensor]:
        """One pass: ``sum_b scale_b contribute(b)`` over the batches (and ranks), divided by ``N`` for the mean.

        Args:
            templates: shapes, dtypes and device of the results (the zeros of a rank
                without batches).
            contribute: a batch's results, as ``f``'s (a mean's) derivatives on it.
            what: shown on the progress bar.
            decline: exception types that mean "this path does not apply"; with a
                process group, one rank's is raised on every rank.
            raw: sum the contributions as they are, without the batch weights and the
                mean's division (for sums that weigh their batches themselves: K-FAC's
                factors and their row counts).
            call: the call's :class:`Pass` from :meth:`prepare` (``None``: a pass of its own).

        Returns:
            The results, shaped like ``templates``.
        """
        call = Pass() if call is None else call
        self._reductions += 1
        device = templates[0].device
        acc: Optional[List[Tensor]] = None
        count: Any = 0
        num = 0
        failed: Optional[BaseException] = None
        declined: Optional[BaseException] = None
        passes = self.batches(device, what, call)
        try:
            for batch in passes:
                parts = list(contribute(batch))
                if isinstance(batch.count, Tensor):  # a mean over no terms adds nothing (PyTorch's is nan there)
                    parts = [self._zero_if_empty(batch, p) for p in parts]
                if len(parts) != len(templates):
                    raise RuntimeError(f"internal: {len(parts)} results for {len(templates)} templates")
                scale = None if raw or (isinstance(batch.scale, int) and batch.scale == 1) else batch.scale
                if acc is None:  # a buffer of our own, so that accumulating in place touches nothing else
                    acc = [p.clone() if scale is None else p * scale for p in parts]
                else:
                    acc = [_accumulate(a, p, scale) for a, p in zip(acc, parts)]
                count = count + batch.count
                num += 1
            self._check_batch_count(num, call)
        except decline as err:
            if self.group is None:
                raise
            declined = err
        except Exception as err:
            if self.group is None:
                raise
            failed = err
        finally:
            passes.close()  # now, not when a kept traceback frees it: the pass's progress closes with it
        if acc is None:
            acc = [torch.zeros_like(t) for t in templates]
        if self.group is None:
            total = count
        else:
            acc, total = self._sum_over_ranks(acc, count, num, failed, declined, decline, what)
        if self.reduction == "mean" and not raw:
            if self.num_data is not None:
                total = self.num_data
            elif isinstance(total, Tensor):  # no terms at all (every target ignored): the sums are 0, and stay so
                total = torch.where(total > 0, total, torch.ones_like(total))
            else:
                total = total if total > 0 else 1
            acc = [a.div_(total) if _plain(a) else a / total for a in acc]
        return acc

    # -- the pieces ------------------------------------------------------------------

    def _leaves(self, params: Any) -> List[Tensor]:
        leaves = tree.leaves(params)
        if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
            raise TypeError("params must be a pytree of floating-point tensors (at least one)")
        return leaves

    def _local_batches(self, call: Pass) -> int:
        try:
            n = len(self.data)
        except TypeError:
            n = sum(1 for _ in self.data)
        call.expected = n
        return n

    def _check_batch_count(self, num: int, call: Pass) -> None:
        if call.expected is not None and num != call.expected:
            raise ValueError(
                f"data gave {num} batches in this pass and {call.expected} before: it must give the same batches "
                "on every pass (a one-shot iterator, random subsampling or a changing DataLoader do not)")
        if self.group is None and num == 0:
            if self._seen:
                raise ValueError(
                    f"data gave no batches in this pass, though an earlier pass gave {self._seen}: it must be "
                    "iterable again and again (its __iter__ must start a new pass, not return a spent iterator)")
            raise ValueError("data is empty: it gave no batches")
        call.expected = num
        self._seen = num  # for the message above, in later calls

    def progress_setting(self) -> Optional[bool]:
        """The ``progress`` setting on this process: ``False`` on a rank other than 0 (only rank 0 shows it)."""
        if self.group is not None and self.group.rank != 0:
            return False
        return self.progress

    def batches(self, device: torch.device, what: str, call: Optional[Pass] = None):
        """The checked batches of one pass, moved to ``device``, with their weights.

        The pass advances the call's progress (:mod:`secorder.progress`): the bar of the
        transform call it is part of, or a bar of its own when it runs alone.

        Args:
            device: where the batches go.
            what: shown on the progress bar.
            call: the call's :class:`Pass` (``None``: offsets from 0).
        """
        call = Pass() if call is None else call
        with _progress.call(f"secorder: {what}", self.progress_setting(), unit="batch") as bar:
            yield from self._batches_of_pass(device, bar, call)

    def _batches_of_pass(self, device: torch.device, bar: Any, call: Pass):
        if bar is not None:
            try:
                total: Optional[int] = len(self.data)
            except TypeError:
                total = None
            bar.start_pass(total)
        for i, batch in enumerate(self.data):
            inputs, targets, samples = self._check_batch(i, batch)
            inputs = tree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, inputs)
            targets = tree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, targets)
            if self._count_terms is not None and isinstance(targets, Tensor):
                count, scale = self._count_terms(targets)
            else:
                count, scale = _unknown_terms(i, targets, samples, self.batch_reduction)
            yield Batch(call.offset + i, inputs, targets, count, scale)
            if bar is not None:
                bar.batch_done()

    def _check_batch(self, i: int, batch: Any) -> Tuple[Any, Any, int]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise TypeError(f"data: batch {i} is {got}; expected a pair (inputs, targets)")
        inputs, targets = batch
        target_leaves = [t for t in tree.leaves(targets) if isinstance(t, Tensor)]
        if not target_leaves:
            raise TypeError(f"data: batch {i} has targets of type {type(targets).__name__}; expected a tensor")
        lead = target_leaves[0]
        if lead.dim() == 0:
            return inputs, targets, 1  # one unbatched sample
        samples = lead.shape[0]
        if samples == 0:
            raise ValueError(f"data: batch {i} has no samples (targets of shape {tuple(lead.shape)}); drop empty batches")
        structured = not isinstance(inputs, Tensor)
        for path, leaf in zip(tree.paths(inputs), tree.leaves(inputs)):
            if isinstance(leaf, Tensor) and leaf.dim() >= 1 and not _same_batch(leaf, samples, structured):
                raise ValueError(
                    f"data: batch {i} has targets of shape {tuple(lead.shape)} but inputs{path} of shape "
                    f"{tuple(leaf.shape)}: the leading (batch) dimensions differ")
        return inputs, targets, samples

    def _batch_value(self, params: Any, batch: Batch) -> Tensor:
        value = self.f(params, batch.inputs, batch.targets)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise TypeError(f"f must return a scalar tensor; on batch {batch.index} it returned {_describe(value)}")
        return self._zero_if_empty(batch, value)

    @staticmethod
    def _zero_if_empty(batch: Batch, value: Tensor) -> Tensor:
        """A batch whose mean is over no terms (every target ignored, or of class weight 0) adds nothing (PyTorch's
        mean and its derivatives are nan there)."""
        if isinstance(batch.count, Tensor):
            return torch.where(batch.count > 0, value, torch.zeros_like(value))
        return value

    def _value_and_grad(self, params: Any, call: Optional[Pass] = None) -> Tuple[Tensor, Any]:
        leaves, spec = tree.flatten(params)
        zero = torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device)

        def contribute(batch: Batch) -> List[Tensor]:
            grads, value = torch.func.grad_and_value(self.f)(params, batch.inputs, batch.targets)
            return [self._zero_if_empty(batch, t) for t in [value] + tree.leaves(grads)]

        out = self.reduce([zero] + list(leaves), contribute, "loss and gradient", call=call)
        return out[0], tree.unflatten(spec, out[1:])

    def _check_deterministic(self, params: Any) -> None:
        """Two passes of the loss and gradient must agree (to ``sqrt(eps)``), else a clear error."""
        v1, g1 = self._value_and_grad(params)
        v2, g2 = self._value_and_grad(params)
        a, b = tree.ravel(g1)[0], tree.ravel(g2)[0]
        rtol = torch.finfo(a.dtype).eps ** 0.5
        loss_gap = float((v1 - v2).abs())
        loss_ok = loss_gap <= rtol * float(torch.maximum(v1.abs(), v2.abs())) or loss_gap == 0.0
        grad_gap = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
        if loss_ok and grad_gap <= rtol * scale:
            return
        raise ValueError(
            f"check_deterministic: two passes over the data gave different results (loss {float(v1):.8g} then "
            f"{float(v2):.8g}; gradient entries differ by up to {grad_gap:.3g}, the largest entry is {scale:.3g}); "
            f"every pass must see the same batches and the same function: {_NONDETERMINISTIC_CAUSES}")

    def _sum_over_ranks(self, acc: List[Tensor], count: Any, num: int, failed: Optional[BaseException],
                        declined: Optional[BaseException], decline: Tuple[type, ...],
                        what: str) -> Tuple[List[Tensor], Tensor]:
        """The one collective of a pass: partial sums, counts and flags summed over the ranks."""
        dtype = acc[0].dtype if acc[0].is_floating_point() else torch.float32
        dtype = torch.promote_types(dtype, torch.float32)
        device = acc[0].device
        step = self._reductions % 2048
        count_t = count.to(device=device, dtype=dtype) if isinstance(count, Tensor) else torch.tensor(
            float(count), dtype=dtype, device=device)
        tail = torch.stack([
            count_t.reshape(()),
            torch.tensor(float(num), dtype=dtype, device=device),
            torch.tensor(float(failed is not None), dtype=dtype, device=device),
            torch.tensor(float(declined is not None), dtype=dtype, device=device),
            torch.tensor(float(step), dtype=dtype, device=device),
            torch.tensor(float(step * step), dtype=dtype, device=device),
        ])
        sizes = [a.numel() for a in acc]
        buf = torch.cat([a.reshape(-1).to(dtype) for a in acc] + [tail])
        buf = self.group.all_reduce(buf)
        total, nums, fails, declines, steps, squares = buf[-6:].detach().cpu().tolist()
        size = self.group.size
        if failed is not None:
            raise failed
        if fails > 0:
            raise RuntimeError(f"{int(fails)} other rank(s) of process_group failed during this pass over the data "
                               f"({what}); see their errors")
        if size * squares != steps * steps:
            raise RuntimeError("the ranks of process_group are out of step (they made different numbers of passes "
                               "over the data): every rank must make the same calls on the data-set loss")
        if declined is not None:
            raise declined
        if declines > 0:
            raise decline[0](f"another rank of process_group declined during this pass ({what})")
        if nums == 0:
            raise ValueError("data is empty on every rank of process_group: no batches")
        parts = torch.split(buf[: sum(sizes)], sizes)
        out = [p.reshape(a.shape).to(a.dtype) for p, a in zip(parts, acc)]
        return out, buf[-6].to(acc[0].dtype if acc[0].is_floating_point() else dtype)


def dataset_loss(
    f: Callable[..., Any],
    data: Iterable[Any],
    *,
    reduction: str = "mean",
    num_data: Optional[int] = None,
    progress: Optional[bool] = None,
    check_deterministic: bool = False,
    process_group: Any = None,
    batch_reduction: Optional[str] = None,
) -> DatasetLoss:
    """The loss over a whole data set as a function of the parameters alone: ``F(params)``.

    Every transform accepts ``F`` and gives what the same call gives on one batch
    holding all the data, with the memory of one batch times the probe chunk. Passes
    over the data per call: one for ``so.hvp`` and the curvature products; one per
    chunk of probes for a stochastic trace or diagonal (``num_samples / chunk_size``
    rounded up, per round of a method that needs several: Hutchinson 1, Hutch++ and
    XTrace 2-3 in sequence, XNysTrace 1, XDiag 2; each round of adaptive stopping
    one more); one for an exact diagonal or trace on the structured engine, else
    one per chunk of one-hot columns per leaf; one per Lanczos step
    (``so.eigenvalues``; ``so.spectral_density`` one per step and chunk of probes).
    ``check_deterministic=True`` adds two passes on first use.

    Args:
        f: the per-batch loss ``f(params, inputs, targets)``, returning a scalar:
            for the GGN and Fishers one made by :func:`secorder.functional_loss`.
        data: a re-iterable of ``(inputs, targets)`` batches: a list, a
            ``DataLoader``, any iterable that can be iterated again (not a
            generator); inputs may be tensors or dicts of tensors. Batches are
            moved to the parameters' device.
        reduction: ``"mean"`` (default) or ``"sum"`` of the per-term losses over
            the data set (module docstring: what a batch's weight is).
        num_data: with ``"mean"``, the denominator (the total number of terms
            over all ranks) instead of the count of the terms seen.
        progress: one bar per transform call over its passes, on rank 0 only
            (:mod:`secorder.progress`; plain lines off a terminal with ``True``):
            ``None`` (default) when standard error is a terminal.
        check_deterministic: on first use, make two passes and raise if the loss
            or gradient differ (random augmentation, training-mode layers, batches
            that change between passes; a plain shuffle changes no total and passes).
        process_group: a ``torch.distributed`` process group (such as
            ``torch.distributed.group.WORLD``): each rank passes its shard of the
            data and every rank gets the result over the union of the shards.
            Make ``F`` after ``torch.distributed.init_process_group``: before it,
            ``torch.distributed.group.WORLD`` is ``None``, which means one process
            (a call in a multi-rank run then warns that each rank sees its own data only).
        batch_reduction: for an ``f`` whose loss secorder does not know (module
            docstring), what ``f`` returns on a batch: ``"mean"`` over its samples
            (what ``None``, the default, assumes, except that it refuses integer
            targets with ignored entries) or ``"sum"`` of its terms (with
            ``reduction="mean"``, ``num_data`` is then required). For a known loss it
            must agree with the loss's reduction.

    Returns:
        A :class:`DatasetLoss` ``F``; ``F(params)`` is the loss (one pass) and
        ``F.value_and_grad(params)`` the loss and its gradient.

    Example:
        >>> import torch, secorder as so
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
        >>> F = so.dataset_loss(f, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)])  # 16, 16, 16, 2
        >>> params = so.params_dict(model)
        >>> one_batch = so.diagonal(f, curvature="ggn")(params, x, y)
        >>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(so.diagonal(F, curvature="ggn")(params).values(),
        ...                                                      one_batch.values()))
        True
    """
    return DatasetLoss(f, data, reduction=reduction, num_data=num_data, progress=progress,
                       check_deterministic=check_deterministic, process_group=process_group,
                       batch_reduction=batch_reduction)
