"""``secorder report``: the curvature of a model's loss at initialisation and after a short training run.

Run ``secorder report`` (``report`` is also the default command) with no
arguments to see it on an embedded example, a small MLP on the handwritten
digits that ship with scikit-learn (no download); ``--model
path/to/file.py:factory`` points it at your own code (see
:mod:`secorder.cli.problem`). The report is about the mean loss over the
batches it reads, as a data set (:func:`secorder.dataset_loss`) of batches of at
most ``--batch-size`` examples; training cycles over the batches as read with Adam.
Under ``torchrun --nproc-per-node N -m secorder report`` the batches are sharded
over the ranks, the curvature is still that of the whole data set, and only rank 0
prints (:mod:`secorder.cli.dataset`); ``--shard ddp|fsdp`` measures the model
wrapped in DDP or sharded with FSDP2, as a distributed training script holds it
(training itself runs on the plain model, and a fresh wrapped copy is measured in
each phase).

What "affordable" means for the exact Hessian trace and diagonal: with
``--exact auto`` (the default) they are computed when the fast (structured)
engine applies to the model and loss (curvature backpropagation: a few
backward passes, whatever the size; see :mod:`secorder.transforms.engine`), or
else when the model has at most ``--exact-limit`` parameters (default 20,000),
since the generic path costs one Hessian-vector product per parameter.
``--exact always`` forces them and ``--exact never`` skips them; without them,
the per-layer traces come from the stochastic estimate's probes and the
diagonal summary from a Hutchinson diagonal estimate.

Times exclude PyTorch's one-time set-up of ``torch.func`` (its first
transformed call in a process costs seconds), which a warm-up on a toy
function pays before anything is timed; the JSON reports it as
``seconds.warmup``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import modules, transforms, tree, wrappers
from ..dataset import dataset_loss
from ..estimators import exact as exact_estimators
from ..operators import make_operator
from ..estimators import registry
from ..problem import Problem as _Call
from ..structured.errors import Unsupported
from .dataset import Launch, add_shard_option, broadcast_parameters, gathered, launch, layer_type, rebatch, shard
from .dataset import wrap_model
from .errors import UsageError
from . import options
from .options import (DTYPES, add_batch_size_option, add_problem_options, nonneg_int, positive_float, positive_int,
                      resolve_device)
from .output import Clock, Progress, fmt, format_table
from .problem import Batch, load_problem

__all__ = ["NAME", "HELP", "DESCRIPTION", "JSON_LAYOUT", "METHODS", "add_arguments", "run", "format_text",
           "plain_fallback"]

NAME = "report"
HELP = "Hessian trace, per-layer traces and diagonal at initialisation and after training"
DESCRIPTION = ("Report the curvature of a model's loss at initialisation and after a short training run. "
               "Without --model: a 64-32-10 MLP on scikit-learn's handwritten digits (offline).")
DEFAULT_EXACT_LIMIT = 20_000
DEFAULT_BATCH_SIZE = options.DEFAULT_BATCH_SIZE
#: ``--method``'s choices: the estimator registry's stochastic trace methods, except those
#: meant for positive semi-definite operators only (a network's Hessian is indefinite).
METHODS = tuple(e.name for e in registry.estimators("trace") if e.stochastic and not e.psd_only)

logger = logging.getLogger(__name__)

#: The keys of ``secorder report --json``, with what each holds. A nested dict is an
#: object with exactly these keys; a one-element list, a list of such objects. The
#: CLI page of the docs is generated from it, and a test checks a real report against it.
JSON_LAYOUT: Dict[str, Any] = OrderedDict([
    ("model", "the ``--model`` target, or a description of the default problem"),
    ("num_params", "number of trainable parameter entries"),
    ("num_batches", "batches of the data set, over all processes (the batches read, at most ``--max-batches``, "
                    "split into batches of at most ``--batch-size`` examples)"),
    ("batch_size", "``--batch-size``"),
    ("processes", "processes the data set is sharded over (``torchrun --nproc-per-node``; 1 without torchrun)"),
    ("shard", "``--shard``: how the measured model is distributed (``none``, ``ddp`` or ``fsdp``)"),
    ("device", "the device, such as ``cpu`` or ``cuda:0``"),
    ("dtype", "``float32`` or ``float64``"),
    ("seed", "the ``--seed``"),
    ("steps", "the ``--steps`` of training between the phases"),
    ("lr", "the Adam learning rate ``--lr``"),
    ("last_train_loss", "the loss of the last training batch (``null`` if not finite or no steps)"),
    ("exact", OrderedDict([
        ("mode", "``--exact``: ``auto``, ``always`` or ``never``"),
        ("limit", "``--exact-limit``"),
        ("computed", "whether both phases have the exact trace and diagonal"),
        ("engine", "``structured`` (the fast engine), ``generic`` (one Hessian-vector product per parameter) "
                   "or ``null``, at initialisation"),
    ])),
    ("phases", [OrderedDict([
        ("phase", "``init`` or ``after N steps`` (only ``init`` with ``--steps 0``)"),
        ("loss", "the mean loss over the batches"),
        ("exact", OrderedDict([
            ("computed", "whether the exact curvature was computed in this phase"),
            ("engine", "``structured``, ``generic`` or ``null``"),
            ("reason", "why it was skipped (``null`` when computed)"),
            ("structured_fallback_reason", "why the fast engine did not run, in the engine's words "
                                           "(``null`` when it ran or was not tried)"),
        ])),
        ("exact_trace", "the exact Hessian trace (``null`` when skipped)"),
        ("stochastic_trace", OrderedDict([
            ("method", "``--method``"),
            ("estimate", "the estimated trace"),
            ("stderr", "its standard error"),
            ("ci95", "95% confidence interval ``[low, high]``"),
            ("num_samples", "``--num-samples``"),
            ("matvecs", "Hessian-vector products spent"),
        ])),
        ("per_param_trace", "trace of each parameter's diagonal block, by parameter name"),
        ("per_layer_trace", "the same summed per module, by label such as ``0 (Linear)``"),
        ("per_layer_source", "where the per-layer traces come from (exact, or the estimate's probes)"),
        ("diagonal", OrderedDict([
            ("source", "exact (which engine), or the Hutchinson estimate with its matvec count"),
            ("exact", "whether the diagonal is exact"),
            ("min", "smallest diagonal entry"),
            ("median", "median entry"),
            ("max", "largest entry"),
            ("negative_share", "share of negative entries, 0 to 1"),
            ("matvecs", "Hessian-vector products of the diagonal estimate (``null`` when exact)"),
        ])),
        ("seconds", "wall time of each part of the phase: ``training`` (after training), ``loss``, "
                    "``exact``, ``stochastic``, ``diagonal``, as they ran"),
    ])]),
    ("seconds", OrderedDict([
        ("setup", "loading and checking the problem"),
        ("warmup", "PyTorch's one-time ``torch.func`` set-up, paid on a toy function before anything is timed"),
    ])),
    ("warnings", "a list of sentences: a diverged loss, non-finite curvature, numbers written as ``null``"),
])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``secorder report``."""
    add_problem_options(parser)
    add_shard_option(parser)
    parser.add_argument("--steps", type=nonneg_int, default=200,
                        help="training steps between the two reports (default 200)")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate for training (default 0.01)")
    parser.add_argument("--num-samples", type=positive_int, default=100,
                        help="random probes for the stochastic estimate (default 100)")
    parser.add_argument("--method", choices=METHODS, default="hutchinson",
                        help="stochastic trace estimator (default hutchinson); see the docs' 'Choosing an estimator'")
    add_batch_size_option(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="probes per batched Hessian-vector product (default: chosen by secorder)")
    parser.add_argument("--exact", choices=("auto", "always", "never"), default="auto",
                        help="exact Hessian trace and diagonal: 'auto' computes them when the fast engine applies "
                             "(a few backward passes) or the model has at most --exact-limit parameters "
                             "(one Hessian-vector product per parameter); 'always' forces them")
    parser.add_argument("--exact-limit", type=nonneg_int, default=DEFAULT_EXACT_LIMIT,
                        help="parameter count up to which --exact auto computes the exact curvature without the fast "
                             f"engine (default {DEFAULT_EXACT_LIMIT})")
    parser.add_argument("--engine", choices=("auto", "generic"), default="auto",
                        help="exact curvature: 'auto' uses the fast (structured) engine when the model and loss "
                             "qualify, 'generic' always uses one-hot Hessian-vector products")


# ---------------------------------------------------------------------------
# plain words for the structured engine's reasons


_MODULE = re.compile(r"module '([^']*)' \(([^)]+)\) (is not supported|.*)")
_LOSS = re.compile(r"loss (\S+) is not supported")


def plain_fallback(reason: Optional[str]) -> str:
    """Why the fast engine did not run, in a few words for someone who never passed ``engine=``.

    Example:
        >>> plain_fallback("engine='structured' cannot run: module '3' (LayerNorm) is not supported by the "
        ...                "structured engine")
        'the fast engine does not support LayerNorm at layer 3'
        >>> plain_fallback("module 'body.0' (Linear) on an input of shape (2, 3, 4) (only [N, in])")
        'the fast engine cannot handle Linear at layer body.0'
        >>> plain_fallback("--engine generic")
        '--engine generic'
    """
    if reason is None:
        return "the fast engine ran"
    if reason.startswith("--"):
        return reason
    match = _MODULE.search(reason)
    if match:
        name, kind, what = match.groups()
        where = "as the whole model" if name in ("", "<root>") else f"at layer {name}"
        verb = "does not support" if what.startswith("is not supported") else "cannot handle"
        return f"the fast engine {verb} {kind} {where}"
    match = _LOSS.search(reason)
    if match:
        return f"the fast engine does not support the loss {match.group(1)}"
    return "the fast engine does not apply to this model and loss"


# ---------------------------------------------------------------------------
# the measurements


def _layer_labels(model: nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """Parameter name -> its layer's label, such as ``"0 (Linear)"`` for ``"0.weight"``."""
    labels = {}
    for name in names:
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        labels[name] = f"{prefix or '<root>'} ({layer_type(model, prefix)})"
    return labels


def _per_layer(per_param: Dict[str, float], labels: Dict[str, str]) -> Dict[str, float]:
    out: Dict[str, float] = OrderedDict()
    for name, value in per_param.items():
        out[labels[name]] = out.get(labels[name], 0.0) + value
    return out


def _diag_summary(flat: Tensor, source: str, matvecs: Optional[int]) -> Dict[str, Any]:
    flat = flat.detach().double().cpu()
    return OrderedDict([
        ("source", source),
        ("exact", matvecs is None),
        ("min", float(flat.min())),
        ("median", float(flat.median())),
        ("max", float(flat.max())),
        ("negative_share", float((flat < 0).double().mean())),
        ("matvecs", matvecs),
    ])


class _Loss:
    """The user's problem as ``f(params)``, the mean loss over the data set (this rank's shard), and its exact diagonal."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: List[Batch], engine: str, where: Launch,
                 progress: bool):
        self.model = model
        self.loss = modules.functional_loss(model, loss_fn)
        self.F = dataset_loss(self.loss, shard(batches, where), progress=progress, process_group=where.group)
        self.labels = _layer_labels(model, modules.params_dict(model))
        self.structured_reason: Optional[str] = None if engine == "auto" else "--engine generic"

    def f(self, params: Dict[str, Tensor]) -> Tensor:
        return self.F(params)

    def structured_diagonal(self, params: Dict[str, Tensor], progress: bool) -> Optional[Dict[str, Tensor]]:
        """The exact diagonal by the fast engine (one pass), or ``None`` (reason kept and logged) when it does not apply."""
        if self.structured_reason is not None:
            return None
        try:
            return gathered(transforms.hessian_diag(self.F, engine="structured")(params))
        except Unsupported as exc:
            self.structured_reason = str(exc)
            logger.info("exact curvature by Hessian-vector products: %s", exc)
            return None

    def generic_diagonal(self, params: Dict[str, Tensor], progress: bool) -> Dict[str, Tensor]:
        """The exact diagonal from one-hot Hessian-vector products; the bar advances per chunk of columns."""
        if any(wrappers.is_dtensor(t) for t in params.values()):  # shards: the transform gathers them
            return gathered(transforms.hessian_diag(self.F, engine="generic")(params))
        _, spec = tree.flatten(params)
        op = make_operator("hessian", _Call(self.F, 0, False, (params,)))
        with Progress(op.dim, "exact diagonal (one-hot HVPs)", progress, unit="col") as bar:
            def block_matvec(index: int, columns: Tensor) -> Tensor:
                out = op.block_matvec(index, columns)
                bar.update(columns.shape[0])
                return out

            counted = dataclasses.replace(op, block_matvec=block_matvec)
            return tree.unflatten(spec, exact_estimators.exact_diagonal(counted))


def _warm_up(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Pay PyTorch's one-time ``torch.func`` set-up (seconds) on a toy function, outside the timed parts."""
    estimator = registry.get(method, "trace")
    num_samples = estimator.min_samples + (estimator.min_samples % 2 if estimator.even else 0)
    x = torch.ones(3, device=device, dtype=dtype)
    transforms.trace_estimate(lambda p: (p ** 3).sum(), method=method, num_samples=num_samples, seed=0)(x)


def _measure(loss: _Loss, params: Dict[str, Tensor], args: argparse.Namespace, clock: Clock,
             phase: str = "init") -> Dict[str, Any]:
    """One phase of the report: loss, exact and stochastic curvature, with wall times (logged with ``-v``)."""
    times: Dict[str, float] = OrderedDict()
    t = clock.now()
    result: Dict[str, Any] = OrderedDict(loss=float(loss.f(params).detach()))
    times["loss"] = clock.now() - t
    logger.info("%s: loss %s, one pass over the data set, %.3f s", phase, fmt(result["loss"]), times["loss"])

    exact_diag: Optional[Dict[str, Tensor]] = None
    info: Dict[str, Any] = OrderedDict(computed=False, engine=None, reason=None, structured_fallback_reason=None)
    if args.exact == "never":
        info["reason"] = "--exact never"
    else:
        t = clock.now()
        exact_diag = loss.structured_diagonal(params, args.progress)
        if exact_diag is not None:
            info["engine"] = "structured"
        elif args.exact == "always" or tree.size(params) <= args.exact_limit:
            exact_diag = loss.generic_diagonal(params, args.progress)
            info["engine"] = "generic"
        else:
            info["reason"] = f"{tree.size(params)} parameters > --exact-limit {args.exact_limit}"
        info["structured_fallback_reason"] = loss.structured_reason
        if exact_diag is not None:
            times["exact"] = clock.now() - t
            info["computed"] = True
    _log_exact(phase, info, tree.size(params), times.get("exact"))
    result["exact"] = info
    per_param = {n: float(d.sum()) for n, d in exact_diag.items()} if exact_diag is not None else None
    result["exact_trace"] = float(sum(per_param.values())) if per_param is not None else None

    t = clock.now()
    est = transforms.trace_estimate(loss.F, method=args.method, num_samples=args.num_samples, seed=args.seed,
                                   chunk_size=args.chunk_size)(params)
    lo, hi = est.interval(0.95)
    times["stochastic"] = clock.now() - t
    logger.info("%s: stochastic trace by %s: %d probes, %d Hessian-vector products (chunk size %s), each a pass "
                "over the data set, %.3f s", phase, args.method, args.num_samples, int(est.num_matvecs),
                args.chunk_size or "auto", times["stochastic"])
    result["stochastic_trace"] = OrderedDict([
        ("method", args.method), ("estimate", float(est.value)), ("stderr", float(est.stderr)),
        ("ci95", [float(lo), float(hi)]), ("num_samples", args.num_samples), ("matvecs", int(est.num_matvecs)),
    ])

    if per_param is not None:
        source = "exact, fast engine" if info["engine"] == "structured" else "exact, one-hot HVPs"
        diagonal = _diag_summary(tree.ravel(exact_diag)[0], source, None)
    else:
        per_param = {n: float(v) for n, v in est.per_leaf.items()}
        source = f"{args.method}, same probes"
        t = clock.now()
        diag = transforms.hessian_diag_estimate(loss.F, method="hutchinson", num_samples=args.num_samples,
                                               seed=args.seed, chunk_size=args.chunk_size)(params)
        diag = diag._replace(value=gathered(diag.value))
        times["diagonal"] = clock.now() - t
        matvecs = int(diag.num_matvecs)
        logger.info("%s: diagonal by a Hutchinson estimate (no exact diagonal): %d Hessian-vector products, %.3f s",
                    phase, matvecs, times["diagonal"])
        diagonal = _diag_summary(tree.ravel(diag.value)[0], f"hutchinson, {matvecs} matvecs", matvecs)
    result["per_param_trace"] = per_param
    result["per_layer_trace"] = _per_layer(per_param, loss.labels)
    result["per_layer_source"] = source
    result["diagonal"] = diagonal
    result["seconds"] = times
    return result


def _log_exact(phase: str, info: Dict[str, Any], n: int, seconds: Optional[float]) -> None:
    """Which exact path ran and why, for ``-v``."""
    if info["engine"] == "structured":
        logger.info("%s: exact trace and diagonal by the fast (structured) engine, curvature backpropagation in a "
                    "few backward passes, %.3f s", phase, seconds)
    elif info["engine"] == "generic":
        logger.info("%s: exact trace and diagonal by one-hot Hessian-vector products, one per parameter (%d), "
                    "because %s; %.3f s", phase, n, plain_fallback(info["structured_fallback_reason"]), seconds)
    else:
        logger.info("%s: exact curvature skipped: %s", phase, info["reason"])


def _train(model: nn.Module, loss_fn: Callable, batches: Sequence[Batch], args: argparse.Namespace,
           where: Launch) -> Optional[float]:
    """``--steps`` Adam steps cycling over ``batches``; returns the last batch loss (``None`` without steps).

    Every rank trains the same way on all the batches; rank 0's parameters are then given to all.
    """
    if args.steps == 0:
        return None
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    last: Any = None
    for step in Progress.over(range(args.steps), args.steps, "training", args.progress):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        last = loss.detach()
    model.eval()
    broadcast_parameters(model, where)
    return float(last)


def _warnings(phases: List[Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    """Sentences about numbers that are not finite: a diverged loss first, then the curvature."""
    out = []
    init, trained = phases[0], phases[-1]
    if not math.isfinite(init["loss"]):
        out.append(f"the loss is {init['loss']} at initialisation: check the model, the data and --dtype")
    elif not math.isfinite(trained["loss"]):
        out.append(f"the loss is {trained['loss']} after {args.steps} steps: training diverged "
                   f"(--lr {args.lr:g}); try a smaller --lr")
    elif trained["loss"] > init["loss"]:
        out.append(f"the loss rose from {fmt(init['loss'])} to {fmt(trained['loss'])} in {args.steps} steps "
                   f"(--lr {args.lr:g}); try a smaller --lr")
    for p in phases:
        values = {"exact trace": p["exact_trace"], "trace estimate": p["stochastic_trace"]["estimate"]}
        bad = [f"{k} {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]
        if bad and math.isfinite(p["loss"]):
            out.append(f"{p['phase']}: the curvature is not finite ({', '.join(bad)})")
    return out


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Load the problem, measure, train, measure again; the report as a JSON-ready dict (see :data:`JSON_LAYOUT`).

    Under ``torchrun``, every rank runs it on its shard and only rank 0 returns the
    report (the others return ``None``, and print nothing).
    """
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    try:  # the estimator checks its options when it is created, before any work
        transforms.trace_estimate(lambda p: p, method=args.method, num_samples=args.num_samples)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--method {args.method} --num-samples {args.num_samples}: {exc}") from exc
    where = launch(device, args.shard)
    try:
        report = _report(args, where.device, dtype, where)
    finally:
        where.close()
    return report if where.printer else None


def _report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, where: Launch) -> Dict[str, Any]:
    progress = args.progress and where.printer
    args = argparse.Namespace(**{**vars(args), "progress": progress})
    clock = Clock(device)
    t = clock.now()
    problem = load_problem(args.model, max_batches=args.max_batches, device=device, dtype=dtype, seed=args.seed)
    batches = rebatch(problem.batches, args.batch_size)
    broadcast_parameters(problem.model, where)
    setup_s = clock.now() - t
    logger.info("problem %s: %d parameters; %d batch(es) read (--max-batches %d), passed as %d batch(es) of at most "
                "%d (--batch-size); %.3f s", problem.name, tree.size(modules.params_dict(problem.model)),
                len(problem.batches), args.max_batches, len(batches), args.batch_size, setup_s)
    t = clock.now()
    _warm_up(args.method, device, dtype)
    warmup_s = clock.now() - t
    logger.info("torch.func one-time set-up paid on a toy function: %.3f s (not in the times below)", warmup_s)

    model = problem.model
    measured = wrap_model(model, args.shard, where)
    loss = _Loss(measured, problem.loss_fn, batches, args.engine, where, progress)
    init = _measure(loss, modules.params_dict(measured), args, clock)
    phases = [OrderedDict(phase="init", **init)]
    last = None
    if args.steps > 0:  # without training, a second phase would repeat the first
        t = clock.now()
        last = _train(model, problem.loss_fn, problem.batches, args, where)
        train_s = clock.now() - t
        logger.info("training: %d Adam steps (--lr %g) cycling over %d batch(es), %.3f s", args.steps, args.lr,
                    len(problem.batches), train_s)
        if args.shard != "none":  # a fresh wrapped copy of the trained model
            measured = wrap_model(model, args.shard, where)
            loss = _Loss(measured, problem.loss_fn, batches, args.engine, where, progress)
        trained = _measure(loss, modules.params_dict(measured), args, clock, f"after {args.steps} steps")
        trained["seconds"] = OrderedDict([("training", train_s), *trained["seconds"].items()])
        phases.append(OrderedDict(phase=f"after {args.steps} steps", **trained))
    return OrderedDict([
        ("model", problem.name),
        ("num_params", tree.size(modules.params_dict(model))),
        ("num_batches", len(batches)),
        ("batch_size", args.batch_size),
        ("processes", where.size),
        ("shard", args.shard),
        ("device", str(device)),
        ("dtype", args.dtype),
        ("seed", args.seed),
        ("steps", args.steps),
        ("lr", args.lr),
        ("last_train_loss", last),
        ("exact", OrderedDict([
            ("mode", args.exact), ("limit", args.exact_limit),
            ("computed", all(p["exact"]["computed"] for p in phases)), ("engine", phases[0]["exact"]["engine"]),
        ])),
        ("phases", phases),
        ("seconds", OrderedDict(setup=setup_s, warmup=warmup_s)),
        ("warnings", _warnings(phases, args)),
    ])


# ---------------------------------------------------------------------------
# the text report


def _exact_line(first: Dict[str, Any]) -> str:
    fallback = first["structured_fallback_reason"]
    if first["engine"] == "structured":
        return "exact curvature: fast engine (curvature backpropagation, a few backward passes)"
    if first["engine"] == "generic":
        return f"exact curvature: Hessian-vector products, one per parameter ({plain_fallback(fallback)})"
    if fallback is None:
        return f"exact curvature skipped: {first['reason']}"
    if fallback.startswith("--"):
        return f"exact curvature skipped: {first['reason']} ({fallback}; --exact always forces it)"
    return f"exact curvature skipped: {first['reason']} and {plain_fallback(fallback)} (--exact always forces it)"


def format_text(report: Dict[str, Any]) -> str:
    """The human-readable report of :func:`run`'s result, every column as wide as its content."""
    phases = report["phases"]
    lines = [
        f"secorder report: {report['model']}",
        f"  {report['num_params']} parameters, {report['num_batches']} batch(es) of at most {report['batch_size']}"
        + (f" on {report['processes']} processes" if report["processes"] > 1 else "")
        + f", device {report['device']}, {report['dtype']}, seed {report['seed']}",
        *(f"  warning: {w}" for w in report["warnings"]),
        f"  {_exact_line(phases[0]['exact'])}",
        "",
    ]
    st = [p["stochastic_trace"] for p in phases]

    def row(label: str, cell: Callable[[Dict[str, Any]], str]) -> Tuple[str, List[str]]:
        return label, [cell(p) for p in phases]

    rows: List[Tuple[str, Optional[List[str]]]] = [
        row("", lambda p: p["phase"]),
        row("loss", lambda p: fmt(p["loss"])),
        row("Hessian trace (exact)", lambda p: fmt(p["exact_trace"])),
        row(f"Hessian trace ({st[0]['method']})", lambda p: fmt(p["stochastic_trace"]["estimate"])),
        row("  95% interval", lambda p: "[{}, {}]".format(*map(fmt, p["stochastic_trace"]["ci95"]))),
        row("  matvecs", lambda p: str(p["stochastic_trace"]["matvecs"])),
        (f"per-layer trace ({phases[0]['per_layer_source']})", None),
        *(row(f"  {layer}", lambda p, layer=layer: fmt(p["per_layer_trace"][layer]))
          for layer in phases[0]["per_layer_trace"]),
        (f"Hessian diagonal ({phases[0]['diagonal']['source']})", None),
        *(row(f"  {key}", lambda p, key=key: fmt(p["diagonal"][key])) for key in ("min", "median", "max")),
        row("  negative entries", lambda p: f"{100 * p['diagonal']['negative_share']:.1f}%"),
        (f"wall time (s), after a one-time torch.func warm-up of {report['seconds']['warmup']:.2f} s", None),
    ]
    keys: List[str] = []
    for p in phases:
        keys += [k for k in p["seconds"] if k not in keys]
    rows += [row(f"  {key}", lambda p, key=key: f"{p['seconds'][key]:.3f}" if key in p["seconds"] else "-")
             for key in keys]
    return "\n".join(lines) + "\n" + format_table(rows, indent=2)
