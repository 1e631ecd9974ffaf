"""The structured engine on a data-set loss: each batch visited once, the batch diagonals weighted and summed.

For ``F = so.dataset_loss(f, data)`` with ``f`` a :class:`secorder.FunctionalLoss`,
:func:`functional_call_diag` runs the engine
(:func:`secorder.structured.dispatch.functional_call_diag`) on every batch in one
pass and returns ``sum_b w_b d_b`` (``w_b = n_b / N`` for the mean,
:mod:`secorder.dataset`), summed over the ranks with one all-reduce. The
Monte-Carlo Fisher's labels of batch ``b`` come from the same per-batch generator
as on the generic path, so both paths give the same matrix. When the engine
declines a batch (on any rank), every rank raises
:class:`~secorder.structured.errors.Unsupported` and the transforms fall back to
the generic path, with the call's generator as it was.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Linear(2, 1)
    >>> f = so.functional_loss(model, torch.nn.MSELoss())
    >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
    >>> F = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])
    >>> d = functional_call_diag(F, (so.params_dict(model),), "ggn", False)
    >>> torch.allclose(d["weight"], 2 * (x ** 2).mean(0, keepdim=True))
    True
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..dataset import Batch, DatasetLoss, check_call_arguments
from . import dispatch
from .errors import Unsupported

__all__ = ["functional_call_diag"]


def functional_call_diag(
    F: DatasetLoss,
    args: tuple,
    kind: str,
    trace: bool,
    *,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    factor_chunk_size: Optional[int] = None,
    check_only: bool = False,
) -> Any:
    """The engine's diagonal (a dict like ``params``) or trace of ``F(params)``, in one pass over the data.

    Args:
        F: a data-set loss whose per-batch loss the engine supports.
        args: ``(params,)``.
        kind: the curvature (:data:`secorder.structured.dispatch.KINDS`).
        trace: return the trace instead of the diagonal.
        mc_samples: Monte-Carlo labels per sample (``kind="fisher"``).
        generator: the call's generator (the Fisher's labels).
        factor_chunk_size: see :func:`secorder.structured.dispatch.functional_call_diag`.
        check_only: the engine's checks and forward pass on every batch of this
            process, nothing else (no handshake with other ranks); returns ``None``.

    Returns:
        The diagonal or the trace (``None`` with ``check_only``).

    Raises:
        Unsupported: the engine does not apply (on any batch of any rank).
    """
    check_call_arguments(args, {})
    params = args[0]
    if not isinstance(params, dict) or not params or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise Unsupported("params must be a non-empty dict of tensors")
    names = list(params)
    first = params[names[0]]
    if check_only:
        for batch in F.batches(first.device, "structured engine checks"):
            dispatch.functional_call_diag(F.f, (params, batch.inputs, batch.targets), kind, trace,
                                          mc_samples=mc_samples, check_only=True)
        return None
    sampled = kind == "fisher"
    call = F.prepare(params, f"structured {kind} {'trace' if trace else 'diagonal'}", offsets=sampled)
    labels, undo, commit = F.label_generators(generator, first.device, deferred=True) if sampled else (
        None, None, None)

    def contribute(batch: Batch):
        out = dispatch.functional_call_diag(
            F.f, (params, batch.inputs, batch.targets), kind, trace, mc_samples=mc_samples,
            generator=labels(batch) if labels is not None else None, factor_chunk_size=factor_chunk_size)
        return [out] if trace else [out[n] for n in names]

    templates = [torch.zeros((), dtype=first.dtype, device=first.device)] if trace else [params[n] for n in names]
    what = f"structured {kind} {'trace' if trace else 'diagonal'}"
    try:
        result = F.reduce(templates, contribute, what, decline=(Unsupported,), call=call)
    except Unsupported:
        if undo is not None:
            undo()
        raise
    if commit is not None:
        commit()
    return result[0] if trace else dict(zip(names, result))
