"""``secorder spectrum``: the top eigenvalues and the eigenvalue density of a model's curvature, before and after training.

Run ``secorder spectrum`` with no arguments to see it on the embedded example (a
small MLP on scikit-learn's handwritten digits, no download); ``--model
path/to/file.py:factory`` points it at your own code (see
:mod:`secorder.cli.problem`). For each phase (at initialisation and after
``--steps`` Adam steps) it prints

* the ``-k`` largest eigenvalues of the curvature (``--curvature``, the Hessian by
  default), from :func:`secorder.eigenvalues` (Lanczos with partial
  reorthogonalisation, residuals below ``--tol`` times the largest eigenvalue),
  and the smallest one (negative for a Hessian away from a minimum);
* a summary of the eigenvalue density from :func:`secorder.spectral_density`
  (``--num-probes`` Lanczos runs of ``--num-iterations`` steps): the range of its
  nodes, its trace estimate and the share of its mass on negative eigenvalues;

and with ``--out FILE.png`` draws both densities in one figure (needs matplotlib,
the ``plot`` extra). The data are handled as by ``report``: the loss is the mean
over the batches read (at most ``--max-batches``), as a data set
(:func:`secorder.dataset_loss`) of batches of at most ``--batch-size`` examples,
and every curvature (``hessian``, ``ggn``, ``fisher``, ``empirical_fisher``) is
that of the whole data set: each product is one pass over the batches.

Under ``torchrun`` the batches are sharded over the ranks (a data-set loss with
the process group), and rank 0 prints; ``--shard ddp|fsdp`` measures the model
wrapped in DDP or sharded with FSDP2 (:func:`secorder.cli.dataset.wrap_model`),
the Lanczos bases then held in shards like the parameters.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import modules, operators, tree
from ..dataset import dataset_loss
from ..transforms.spectra import eigenvalues, spectral_density
from .dataset import Launch, add_shard_option, broadcast_parameters, launch, rebatch, shard, wrap_model
from .errors import UsageError
from .options import (DTYPES, add_batch_size_option, add_problem_options, nonneg_int, positive_float, positive_int,
                      resolve_device)
from .output import Clock, Progress, fmt, format_table
from .problem import Batch, load_problem

__all__ = ["NAME", "HELP", "DESCRIPTION", "JSON_LAYOUT", "add_arguments", "run", "format_text"]

logger = logging.getLogger(__name__)

NAME = "spectrum"
HELP = "top eigenvalues and eigenvalue density of the Hessian (or GGN, Fisher) at initialisation and after training"
DESCRIPTION = ("Top eigenvalues and the eigenvalue density of a model's curvature, at initialisation and after a "
               "short training run; --out draws the densities. Without --model: a 64-32-10 MLP on "
               "scikit-learn's handwritten digits (offline).")

#: The keys of ``secorder spectrum --json`` with what each holds (see :data:`secorder.cli.report.JSON_LAYOUT`).
JSON_LAYOUT: Dict[str, Any] = OrderedDict([
    ("model", "the ``--model`` target, or a description of the default problem"),
    ("num_params", "number of trainable parameter entries (the matrix is this size squared)"),
    ("num_batches", "batches of the data set, over all processes (the batches read, at most ``--max-batches``, "
                    "split into batches of at most ``--batch-size`` examples)"),
    ("batch_size", "``--batch-size``"),
    ("processes", "processes the data set is sharded over (``torchrun --nproc-per-node``; 1 without torchrun)"),
    ("shard", "``--shard``: how the measured model is distributed (``none``, ``ddp`` or ``fsdp``)"),
    ("device", "the device, such as ``cpu`` or ``cuda:0``"),
    ("dtype", "``float32`` or ``float64``"),
    ("seed", "the ``--seed``"),
    ("curvature", "``--curvature``: ``hessian``, ``ggn``, ``fisher`` or ``empirical_fisher``"),
    ("k", "how many of the largest eigenvalues were computed (``-k``, at most ``num_params``)"),
    ("tol", "``--tol``, the relative residual the eigenvalues were computed to"),
    ("num_probes", "``--num-probes`` of the density"),
    ("num_iterations", "Lanczos steps per probe of the density (``--num-iterations``, at most ``num_params``)"),
    ("steps", "the ``--steps`` of training between the phases"),
    ("lr", "the Adam learning rate ``--lr``"),
    ("last_train_loss", "the loss of the last training batch (``null`` if not finite or no steps)"),
    ("phases", [OrderedDict([
        ("phase", "``init`` or ``after N steps`` (only ``init`` with ``--steps 0``)"),
        ("loss", "the mean loss over the batches"),
        ("top_eigenvalues", "the ``k`` largest eigenvalues, descending"),
        ("smallest_eigenvalue", "the smallest eigenvalue"),
        ("density", OrderedDict([
            ("min_node", "the smallest quadrature node (an estimate of the smallest eigenvalue)"),
            ("max_node", "the largest quadrature node (an estimate of the largest eigenvalue)"),
            ("trace", "the density's trace estimate (``num_params`` times its mean)"),
            ("negative_mass", "share of the density on negative eigenvalues, 0 to 1 (below ``-100 eps`` times the "
                              "largest node magnitude: rounding-level zeros do not count)"),
            ("matvecs", "matrix-vector products spent on the density"),
            ("invariant_probes", "probes whose Lanczos run found an invariant subspace (an exact quadrature)"),
        ])),
        ("seconds", "wall time of each part of the phase: ``training`` (after training), ``eigenvalues``, "
                    "``density``"),
    ])]),
    ("plot", "the PNG written by ``--out`` (``null`` without it)"),
    ("seconds", OrderedDict([
        ("setup", "loading and checking the problem"),
        ("warmup", "PyTorch's one-time ``torch.func`` set-up, paid on a toy function before anything is timed"),
    ])),
    ("warnings", "a list of sentences: a diverged loss, non-finite curvature, numbers written as ``null``"),
])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``secorder spectrum``."""
    add_problem_options(parser)
    add_shard_option(parser)
    add_batch_size_option(parser)
    parser.add_argument("--steps", type=nonneg_int, default=200,
                        help="training steps between the two phases (default 200)")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate for training (default 0.01)")
    parser.add_argument("--curvature", choices=operators.names(), default="hessian",
                        help="the matrix: hessian (default), ggn, fisher (Monte-Carlo) or empirical_fisher")
    parser.add_argument("-k", "--top-k", dest="k", type=positive_int, default=5,
                        help="how many of the largest eigenvalues to compute (default 5)")
    parser.add_argument("--tol", type=positive_float, default=1e-4,
                        help="relative residual of the eigenvalues, ||H u - lambda u|| / ||H|| (default 1e-4)")
    parser.add_argument("--num-probes", type=positive_int, default=10,
                        help="random probes (Lanczos runs) of the density (default 10)")
    parser.add_argument("--num-iterations", type=positive_int, default=100,
                        help="Lanczos steps per probe of the density (default 100, at most the parameter count)")
    parser.add_argument("--out", metavar="FILE.png", default=None,
                        help="write the densities at initialisation and after training to this PNG (needs matplotlib)")


class _Loss:
    """``F(params)``: the mean loss over the data set, as :func:`secorder.dataset_loss` (this rank's shard).

    Every curvature works over any number of batches: each product is one pass over
    them (and an all-reduce over the ranks under ``torchrun``), as in ``report``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: List[Batch], where: Launch, progress: bool):
        self.F = dataset_loss(modules.functional_loss(model, loss_fn), shard(batches, where), progress=progress,
                              process_group=where.group)

    def mean(self, params: Dict[str, Tensor]) -> Tensor:
        return self.F(params)

    @property
    def f(self) -> Callable[..., Tensor]:
        return self.F

    def args(self, params: Dict[str, Tensor]) -> tuple:
        return (params,)


def _check_plot(out: Any) -> None:
    if out is None:
        return
    if not str(out).lower().endswith(".png"):
        raise UsageError(f"--out {out}: expected a .png file name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out}: the folder {folder} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--out needs matplotlib: pip install matplotlib (from a checkout: pip install -e \".[plot]\")") from None


def _warm_up(device: torch.device, dtype: torch.dtype) -> None:
    """Pay PyTorch's one-time ``torch.func`` set-up (seconds) on a toy function, outside the timed parts."""
    x = torch.ones(3, device=device, dtype=dtype)
    eigenvalues(lambda p: (p ** 3).sum(), num_iterations=2, seed=0)(x)


def _measure(loss: _Loss, params: Dict[str, Tensor], args: argparse.Namespace, clock: Clock, label: str,
             n: int) -> Dict[str, Any]:
    times: Dict[str, float] = OrderedDict()
    result: Dict[str, Any] = OrderedDict(loss=float(loss.mean(params).detach()))
    k, m = min(args.k, n), min(args.num_iterations, n)
    with Progress(3, f"spectrum ({label})", args.progress, unit="task") as bar:
        t = clock.now()
        top = eigenvalues(loss.f, k=k, curvature=args.curvature, tol=args.tol, seed=args.seed)(*loss.args(params))
        bar.update()
        bottom = eigenvalues(loss.f, k=1, which="smallest", curvature=args.curvature, tol=args.tol,
                             seed=args.seed)(*loss.args(params))
        bar.update()
        times["eigenvalues"] = clock.now() - t
        logger.info("%s: the %d largest and the smallest eigenvalue of the %s by Lanczos (tol %g), each product a "
                    "pass over the data set, %.3f s", label, k, args.curvature, args.tol, times["eigenvalues"])
        t = clock.now()
        density = spectral_density(loss.f, curvature=args.curvature, num_probes=args.num_probes,
                                   num_iterations=m, seed=args.seed)(*loss.args(params))
        bar.update()
        times["density"] = clock.now() - t
        logger.info("%s: spectral density by stochastic Lanczos quadrature, %d probes x %d steps, %d products, %.3f s",
                    label, args.num_probes, m, int(density.num_matvecs), times["density"])
    result["top_eigenvalues"] = [float(v) for v in top]
    result["smallest_eigenvalue"] = float(bottom[0])
    nodes, weights = density.nodes.detach().double().cpu(), density.weights.detach().double().cpu()
    # rounding-level zeros (a low-rank GGN has many) do not count as negative
    negative = nodes < -100 * torch.finfo(density.nodes.dtype).eps * float(nodes.abs().max())
    result["density"] = OrderedDict([
        ("min_node", float(nodes.min())),
        ("max_node", float(nodes.max())),
        ("trace", float(density.trace())),
        ("negative_mass", float((weights * negative).sum(dim=1).mean())),
        ("matvecs", int(density.num_matvecs)),
        ("invariant_probes", int((density.num_steps < m).sum())),
    ])
    result["seconds"] = times
    result["_density"] = density  # for the plot; removed before output
    return result


def _train(model: nn.Module, loss_fn: Callable, batches: Sequence[Batch], args: argparse.Namespace) -> float:
    """``--steps`` Adam steps cycling over ``batches``; returns the last batch loss."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    last: Any = float("nan")
    for step in Progress.over(range(args.steps), args.steps, "training", args.progress):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        last = loss.detach()
    model.eval()
    return float(last)


def _plot(phases: List[Dict[str, Any]], out: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for p in phases:
        p["_density"].plot(ax, label=p["phase"])
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def _warnings(phases: List[Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    out = []
    init, trained = phases[0], phases[-1]
    if not math.isfinite(init["loss"]):
        out.append(f"the loss is {init['loss']} at initialisation: check the model, the data and --dtype")
    elif not math.isfinite(trained["loss"]):
        out.append(f"the loss is {trained['loss']} after {args.steps} steps: training diverged "
                   f"(--lr {args.lr:g}); try a smaller --lr")
    for p in phases:
        values = [*p["top_eigenvalues"], p["smallest_eigenvalue"], p["density"]["trace"]]
        if math.isfinite(p["loss"]) and not all(math.isfinite(v) for v in values):
            out.append(f"{p['phase']}: the curvature is not finite")
    return out


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Load the problem, measure, train, measure again; the result as a JSON-ready dict (see :data:`JSON_LAYOUT`).

    Under ``torchrun`` every rank runs it on its shard of the batches and only rank 0
    returns the result (the others return ``None``), as ``report`` does.
    """
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    _check_plot(args.out)
    where = launch(device, args.shard)
    try:
        result = _run(args, where.device, dtype, where)
    finally:
        where.close()
    return result if where.printer else None


def _run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, where: Launch) -> Dict[str, Any]:
    if not where.printer:
        args = argparse.Namespace(**{**vars(args), "progress": False, "out": None})
    clock = Clock(device)
    t = clock.now()
    problem = load_problem(args.model, max_batches=args.max_batches, device=device, dtype=dtype, seed=args.seed)
    batches = rebatch(problem.batches, args.batch_size)
    setup_s = clock.now() - t
    logger.info("problem %s: %d parameters; %d batch(es) read (--max-batches %d), passed as %d batch(es) of at most "
                "%d (--batch-size); %.3f s", problem.name, tree.size(modules.params_dict(problem.model)),
                len(problem.batches), args.max_batches, len(batches), args.batch_size, setup_s)
    t = clock.now()
    _warm_up(device, dtype)
    warmup_s = clock.now() - t

    model = problem.model

    def measured_loss():
        broadcast_parameters(model, where)
        measured = wrap_model(model, args.shard, where)
        return measured, _Loss(measured, problem.loss_fn, batches, where, args.progress)

    measured, loss = measured_loss()
    n = tree.size(modules.params_dict(model))
    try:
        init = _measure(loss, modules.params_dict(measured), args, clock, "init", n)
    except (TypeError, ValueError) as exc:
        if args.curvature == "hessian":
            raise
        # e.g. a Fisher for a loss without a predictive distribution
        raise UsageError(f"--curvature {args.curvature}: {exc}") from exc
    phases = [OrderedDict(phase="init", **init)]
    last = None
    if args.steps > 0:  # without training, a second phase would repeat the first
        t = clock.now()
        last = _train(model, problem.loss_fn, problem.batches, args)
        train_s = clock.now() - t
        logger.info("training: %d Adam steps (--lr %g) cycling over %d batch(es), %.3f s", args.steps, args.lr,
                    len(problem.batches), train_s)
        if args.shard != "none":  # a fresh wrapped copy of the trained model
            measured, loss = measured_loss()
        trained = _measure(loss, modules.params_dict(measured), args, clock, "trained", n)
        trained["seconds"] = OrderedDict([("training", train_s), *trained["seconds"].items()])
        phases.append(OrderedDict(phase=f"after {args.steps} steps", **trained))
    if args.out is not None:
        _plot(phases, args.out, f"{args.curvature} eigenvalue density: {problem.name}")
    for p in phases:
        del p["_density"]
    return OrderedDict([
        ("model", problem.name),
        ("num_params", n),
        ("num_batches", len(batches)),
        ("batch_size", args.batch_size),
        ("processes", where.size),
        ("shard", args.shard),
        ("device", str(device)),
        ("dtype", args.dtype),
        ("seed", args.seed),
        ("curvature", args.curvature),
        ("k", min(args.k, n)),
        ("tol", args.tol),
        ("num_probes", args.num_probes),
        ("num_iterations", min(args.num_iterations, n)),
        ("steps", args.steps),
        ("lr", args.lr),
        ("last_train_loss", last),
        ("phases", phases),
        ("plot", None if args.out is None else os.path.abspath(args.out)),
        ("seconds", OrderedDict(setup=setup_s, warmup=warmup_s)),
        ("warnings", _warnings(phases, args)),
    ])


def format_text(result: Dict[str, Any]) -> str:
    """The human-readable output of :func:`run`'s result."""
    phases = result["phases"]
    lines = [
        f"secorder spectrum: {result['model']}",
        f"  {result['curvature']} of {result['num_params']} parameters, {result['num_batches']} batch(es) of at most "
        f"{result['batch_size']}" + (f" on {result['processes']} processes" if result["processes"] > 1 else "")
        + f", device {result['device']}, {result['dtype']}, seed {result['seed']}",
        *(f"  warning: {w}" for w in result["warnings"]),
        "",
    ]

    def row(label: str, cell: Callable[[Dict[str, Any]], str]):
        return label, [cell(p) for p in phases]

    rows: List[Any] = [
        row("", lambda p: p["phase"]),
        row("loss", lambda p: fmt(p["loss"])),
        (f"top {result['k']} eigenvalues (tol {result['tol']:g})", None),
        *(row(f"  {i + 1}", lambda p, i=i: fmt(p["top_eigenvalues"][i])) for i in range(result["k"])),
        row("smallest eigenvalue", lambda p: fmt(p["smallest_eigenvalue"])),
        (f"density ({result['num_probes']} probes x {result['num_iterations']} Lanczos steps)", None),
        row("  smallest node", lambda p: fmt(p["density"]["min_node"])),
        row("  largest node", lambda p: fmt(p["density"]["max_node"])),
        row("  trace estimate", lambda p: fmt(p["density"]["trace"])),
        row("  negative mass", lambda p: f"{100 * p['density']['negative_mass']:.1f}%"),
        (f"wall time (s), after a one-time torch.func warm-up of {result['seconds']['warmup']:.2f} s", None),
    ]
    keys: List[str] = []
    for p in phases:
        keys += [key for key in p["seconds"] if key not in keys]
    rows += [row(f"  {key}", lambda p, key=key: f"{p['seconds'][key]:.3f}" if key in p["seconds"] else "-")
             for key in keys]
    text = "\n".join(lines) + "\n" + format_table(rows, indent=2)
    if result["plot"] is not None:
        text += f"\n\ndensity plot: {result['plot']}"
    return text
