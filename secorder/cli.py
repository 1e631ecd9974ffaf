"""The ``secorder`` command: a curvature report for a model, at initialisation and after training.

Run ``secorder report`` (or ``python -m secorder report``; ``report`` is also the
default command, so a bare ``secorder`` does the same) with no arguments to see
it on an embedded example, a small MLP on the handwritten digits that ship with
scikit-learn (no download); ``--model pkg.module:factory`` points it at your own
code. ``secorder report --help`` lists the options.

The factory is a callable with no arguments returning ``(model, loss_fn, data)``:
``model`` an ``nn.Module``, ``loss_fn(outputs, targets)`` a scalar loss, and
``data`` either one batch ``(inputs, targets)`` or an iterable of such batches.
The report is about the mean loss over the batches it reads (at most
``--max-batches``); training cycles over the same batches.

What "affordable" means for the exact Hessian trace and diagonal: with
``--exact auto`` (the default) they are computed when the structured engine
applies to the model and loss (curvature backpropagation: a few backward passes,
whatever the size; see :mod:`secorder.structured.hook`), or else when the model
has at most ``--exact-limit`` parameters (default 20,000), since the generic
path costs one Hessian-vector product per parameter. ``--exact always`` forces
them and ``--exact never`` skips them; without them, the per-layer traces come
from the stochastic estimate's probes and the diagonal summary from a Hutchinson
diagonal estimate.

Exit status: 0 on success, 2 for a usage error (a bad ``--model`` target, a
factory returning the wrong thing, a non-scalar loss, an unknown device), 1 for
any other failure. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import estimates as transforms_estimates
from . import __version__, modules, transforms, tree
from .structured.errors import Unsupported

__all__ = ["main", "build_parser", "load_factory", "digits_mlp", "UsageError"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_EXACT_LIMIT = 20_000
STOCHASTIC_METHODS = ("hutchinson", "hutch++", "xtrace")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

Batch = Tuple[Any, Any]


class UsageError(Exception):
    """A mistake in how the command was called or in what the user's factory returned (exit status 2)."""


# ---------------------------------------------------------------------------
# the embedded default problem


def digits_mlp() -> Tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], Batch]:
    """The default problem: an MLP 64-32-10 (tanh) on scikit-learn's 8x8 digits, one batch of 1797 images.

    Pixel values are scaled to [0, 1]. Needs scikit-learn (the ``cli`` extra); no download.

    Example:
        >>> from secorder.cli import digits_mlp
        >>> model, loss_fn, (x, y) = digits_mlp()  # doctest: +SKIP
        >>> tuple(x.shape), tuple(y.shape)  # doctest: +SKIP
        ((1797, 64), (1797,))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError(
            "the default problem needs scikit-learn: pip install 'secorder[cli]' (or pass --model pkg.module:factory)"
        ) from exc
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return model, nn.functional.cross_entropy, (inputs, targets)


# ---------------------------------------------------------------------------
# loading and checking the user's factory


def load_factory(target: str) -> Callable[[], Any]:
    """Resolve ``"pkg.module:factory"`` to a callable, or raise :class:`UsageError` naming what is wrong.

    The current directory is searched first, as ``python -m`` would, so a
    ``myproject.py`` next to you is found by ``--model myproject:make``.

    Example:
        >>> from secorder.cli import load_factory
        >>> load_factory("secorder.cli:digits_mlp").__name__
        'digits_mlp'
        >>> load_factory("secorder.cli")
        Traceback (most recent call last):
        ...
        secorder.cli.UsageError: --model expects 'pkg.module:factory', got 'secorder.cli'
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model expects 'pkg.module:factory', got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--model {target}: cannot import module {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UsageError(f"--model {target}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise UsageError(f"--model {target}: expected a callable factory, got {type(obj).__name__}")
    return obj


def _is_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _check_problem(result: Any, where: str, max_batches: int) -> Tuple[nn.Module, Callable, List[Batch]]:
    """Check a factory's return value and normalise ``data`` to a list of batches."""
    expected = "a tuple (model, loss_fn, data)"
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = f"a {type(result).__name__} of length {len(result)}" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}"
        raise UsageError(f"{where} must return {expected}, got {got}")
    model, loss_fn, data = result
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where} returned a model of type {type(model).__name__}; expected a torch.nn.Module")
    if not callable(loss_fn):
        raise UsageError(f"{where} returned a loss_fn of type {type(loss_fn).__name__}; expected a callable loss_fn(outputs, targets)")
    if _is_batch(data):
        batches = [tuple(data)]
    elif isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise UsageError(
            f"{where} returned data of type {type(data).__name__}; expected a batch (inputs, targets) "
            "or an iterable of such batches"
        )
    else:
        batches = []
        for i, batch in enumerate(itertools.islice(iter(data), max_batches)):
            if not _is_batch(batch):
                raise UsageError(
                    f"{where}: batch {i} of data is a {type(batch).__name__}; expected a pair (inputs, targets) "
                    "whose inputs are a tensor"
                )
            batches.append(tuple(batch))
        if not batches:
            raise UsageError(f"{where} returned an empty iterable of batches")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"{where} returned a model with no trainable parameters")
    return model, loss_fn, batches


def _to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


def _check_scalar_loss(model: nn.Module, loss_fn: Callable, batch: Batch, where: str) -> None:
    with torch.no_grad():
        out = loss_fn(model(batch[0]), batch[1])
    if not isinstance(out, Tensor):
        raise UsageError(f"{where}: loss_fn returned a {type(out).__name__}; expected a scalar tensor")
    if out.ndim != 0:
        raise UsageError(
            f"{where}: loss_fn returned a tensor of shape {tuple(out.shape)}; expected a scalar (0-dim) loss "
            "(use reduction='mean')"
        )
    if not out.is_floating_point():
        raise UsageError(f"{where}: loss_fn returned a {out.dtype} tensor; expected a floating-point loss")


# ---------------------------------------------------------------------------
# the measurements


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def _layer_labels(model: nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """Parameter name -> its layer's label, such as ``"0 (Linear)"`` for ``"0.weight"``."""
    labels = {}
    for name in names:
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        module = model.get_submodule(prefix)
        labels[name] = f"{prefix or '<root>'} ({type(module).__name__})"
    return labels


def _per_layer(per_param: Dict[str, float], labels: Dict[str, str]) -> Dict[str, float]:
    out: Dict[str, float] = OrderedDict()
    for name, value in per_param.items():
        out[labels[name]] = out.get(labels[name], 0.0) + value
    return out


def _diag_summary(flat: Tensor, source: str) -> Dict[str, Any]:
    flat = flat.detach().double().cpu()
    return {
        "source": source,
        "exact": source.startswith("exact"),
        "min": float(flat.min()),
        "median": float(flat.median()),
        "max": float(flat.max()),
        "negative_share": float((flat < 0).double().mean()),
    }


class _Problem:
    """The user's problem on the chosen device: ``f(params)`` is the mean loss over the batches."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: List[Batch], engine: str):
        self.model, self.batches, self.engine = model, batches, engine
        self.loss = modules.functional_loss(model, loss_fn)
        self.labels = _layer_labels(model, modules.params_dict(model))
        self.structured_reason: Optional[str] = None if engine == "auto" else "--engine generic"

    def f(self, params: Dict[str, Tensor]) -> Tensor:
        total = self.loss(params, *self.batches[0])
        for b in self.batches[1:]:
            total = total + self.loss(params, *b)
        return total / len(self.batches)

    def structured_diagonal(self, params: Dict[str, Tensor], progress: bool) -> Optional[Dict[str, Tensor]]:
        """The exact diagonal by the structured engine, or ``None`` (reason kept) when it does not apply."""
        if self.structured_reason is not None:
            return None
        fn = transforms.hessian_diag(self.loss, engine="structured")
        total: Optional[Dict[str, Tensor]] = None
        try:
            for x, y in _progress(self.batches, len(self.batches), "exact diagonal (structured)", progress):
                d = fn(params, x, y)
                total = d if total is None else tree.add(total, d)
        except Unsupported as exc:
            self.structured_reason = str(exc)
            return None
        return tree.scale(total, 1.0 / len(self.batches))

    def generic_diagonal(self, params: Dict[str, Tensor], progress: bool) -> Dict[str, Tensor]:
        """The exact diagonal from one-hot HVPs, leaf by leaf so that a progress bar can follow it."""
        out: Dict[str, Tensor] = OrderedDict()
        for name in _progress(list(params), len(params), "exact diagonal (one-hot HVPs)", progress):
            def f_leaf(p: Tensor, name: str = name) -> Tensor:
                return self.f({**params, name: p})

            out[name] = transforms.hessian_diag(f_leaf, engine="generic")(params[name])
        return out


def _measure(
    problem: _Problem,
    params: Dict[str, Tensor],
    *,
    exact_mode: str,
    exact_limit: int,
    method: str,
    num_samples: int,
    chunk_size: Optional[int],
    seed: int,
    progress: bool,
    clock: _Clock,
) -> Dict[str, Any]:
    """One phase of the report: loss, exact and stochastic curvature, with wall times."""
    times: Dict[str, float] = OrderedDict()
    t = clock.now()
    loss = float(problem.f(params).detach())
    times["loss"] = clock.now() - t
    result: Dict[str, Any] = {"loss": loss}

    exact_diag: Optional[Dict[str, Tensor]] = None
    exact_info: Dict[str, Any] = {"computed": False, "engine": None, "reason": None}
    if exact_mode == "never":
        exact_info["reason"] = "--exact never"
    else:
        t = clock.now()
        exact_diag = problem.structured_diagonal(params, progress)
        if exact_diag is not None:
            exact_info["engine"] = "structured"
        elif exact_mode == "always" or tree.size(params) <= exact_limit:
            exact_diag = problem.generic_diagonal(params, progress)
            exact_info["engine"] = "generic"
        else:
            exact_info["reason"] = (
                f"{tree.size(params)} parameters > --exact-limit {exact_limit} and the structured engine "
                f"does not apply ({problem.structured_reason})"
            )
        if exact_diag is not None:
            times["exact"] = clock.now() - t
            exact_info["computed"] = True
            exact_info["structured_fallback_reason"] = problem.structured_reason
    result["exact"] = exact_info
    per_param = {n: float(d.sum()) for n, d in exact_diag.items()} if exact_diag is not None else None
    result["exact_trace"] = float(sum(per_param.values())) if per_param is not None else None

    t = clock.now()
    est = transforms_estimates.trace_estimate(
        problem.f, method=method, num_samples=num_samples, seed=seed, chunk_size=chunk_size
    )(params)
    lo, hi = est.interval(0.95)
    times["stochastic"] = clock.now() - t
    result["stochastic_trace"] = {
        "method": method,
        "estimate": float(est.value),
        "stderr": float(est.stderr),
        "ci95": [float(lo), float(hi)],
        "num_samples": num_samples,
        "matvecs": int(est.num_matvecs),
    }

    if per_param is not None:
        result["per_param_trace"] = per_param
        source = "exact, structured engine" if exact_info["engine"] == "structured" else "exact, one-hot HVPs"
        result["per_layer_source"] = source
        result["diagonal"] = _diag_summary(tree.ravel(exact_diag)[0], source)
    else:
        per_param = {n: float(v) for n, v in est.per_leaf.items()}
        result["per_param_trace"] = per_param
        result["per_layer_source"] = f"{method}, same probes"
        t = clock.now()
        diag = transforms_estimates.hessian_diag_estimate(
            problem.f, method="hutchinson", num_samples=num_samples, seed=seed, chunk_size=chunk_size
        )(params)
        times["diagonal"] = clock.now() - t
        result["diagonal"] = _diag_summary(tree.ravel(diag.value)[0], f"hutchinson, {int(diag.num_matvecs)} matvecs")
        result["diagonal"]["matvecs"] = int(diag.num_matvecs)
    result["per_layer_trace"] = _per_layer(per_param, problem.labels)
    result["seconds"] = times
    return result


def _train(
    model: nn.Module,
    loss_fn: Callable,
    batches: Sequence[Batch],
    steps: int,
    lr: float,
    progress: bool,
) -> float:
    """``steps`` Adam steps cycling over ``batches``; returns the last batch loss."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    last = float("nan")
    cycle = itertools.cycle(batches)
    for _ in _progress(range(steps), steps, "training", progress):
        x, y = next(cycle)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        last = loss.detach()
    model.eval()
    return float(last)


# ---------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``secorder`` command.

    Example:
        >>> from secorder.cli import build_parser
        >>> args = build_parser().parse_args(["report", "--steps", "5", "--json"])
        >>> args.command, args.steps, args.json, args.exact
        ('report', 5, True, 'auto')
    """
    parser = argparse.ArgumentParser(
        prog="secorder",
        description="Second-order diagnostics for PyTorch models, built on secorder.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    rep = sub.add_parser(
        "report",
        help="Hessian trace, per-layer traces and diagonal at initialisation and after training",
        description=(
            "Report the curvature of a model's loss at initialisation and after a short training run. "
            "Without --model: a 64-32-10 MLP on scikit-learn's handwritten digits (offline)."
        ),
    )
    rep.add_argument("--model", metavar="PKG.MODULE:FACTORY", default=None,
                     help="a callable returning (model, loss_fn, data); data is a batch (inputs, targets) "
                          "or an iterable of batches (default: the embedded digits MLP)")
    rep.add_argument("--steps", type=_nonneg_int, default=200, help="training steps between the two reports (default 200)")
    rep.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate for training (default 0.01)")
    rep.add_argument("--num-samples", type=_pos_int, default=100,
                     help="random probes for the stochastic estimate (default 100)")
    rep.add_argument("--exact", choices=("auto", "always", "never"), default="auto",
                     help="exact Hessian trace and diagonal: 'auto' computes them when the structured engine "
                          "applies (a few backward passes) or the model has at most --exact-limit parameters "
                          "(one Hessian-vector product per parameter); 'always' forces them")
    rep.add_argument("--method", choices=STOCHASTIC_METHODS, default="hutchinson",
                     help="stochastic trace estimator (default hutchinson); see the docs' 'Choosing an estimator'")
    rep.add_argument("--chunk-size", type=_pos_int, default=None,
                     help="probes per batched Hessian-vector product (default: chosen by secorder)")
    rep.add_argument("--engine", choices=("auto", "generic"), default="auto",
                     help="exact curvature: 'auto' uses the structured engine (curvature backpropagation) when the "
                          "model and loss qualify, 'generic' always uses one-hot Hessian-vector products")
    rep.add_argument("--exact-limit", type=_nonneg_int, default=DEFAULT_EXACT_LIMIT,
                     help=f"parameter count up to which --exact auto computes the exact curvature (default {DEFAULT_EXACT_LIMIT})")
    rep.add_argument("--max-batches", type=_pos_int, default=16,
                     help="batches read from an iterable data set (default 16)")
    rep.add_argument("--device", default="cpu", help="device to run on, such as cpu or cuda:0 (default cpu)")
    rep.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="floating-point dtype (default float32)")
    rep.add_argument("--seed", type=int, default=0, help="seed for the model, training and probes (default 0)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    rep.add_argument("--no-progress", action="store_true", help="never show progress bars")
    rep.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _pos_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: unknown device {text!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available on this machine")
    return device


def _run_report(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the problem from ``args``, train, and return the report as a JSON-ready dict."""
    device = _device(args.device)
    dtype = _DTYPES[args.dtype]
    try:  # the estimator checks its options when it is created, before any work
        transforms_estimates.trace_estimate(lambda p: p, method=args.method, num_samples=args.num_samples)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--method {args.method} --num-samples {args.num_samples}: {exc}") from exc
    progress = (not args.no_progress) and sys.stderr.isatty()
    clock = _Clock(device)
    torch.manual_seed(args.seed)

    if args.model is None:
        where, factory = "the default problem", digits_mlp
        name = "digits-mlp (64-32-10 tanh, scikit-learn digits)"
    else:
        where, name = f"--model {args.model}", args.model
        factory = load_factory(args.model)
    t = clock.now()
    try:
        result = factory()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from exc
    model, loss_fn, batches = _check_problem(result, where, args.max_batches)
    model = model.to(device=device, dtype=dtype)
    batches = [_to(b, device, dtype) for b in batches]
    model.eval()
    try:
        _check_scalar_loss(model, loss_fn, batches[0], where)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{where}: computing loss_fn(model(inputs), targets) failed: {type(exc).__name__}: {exc}") from exc
    setup_s = clock.now() - t

    problem = _Problem(model, loss_fn, batches, args.engine)
    num_params = tree.size(modules.params_dict(model))
    common = dict(exact_mode=args.exact, exact_limit=args.exact_limit, method=args.method,
                  num_samples=args.num_samples, chunk_size=args.chunk_size, seed=args.seed, progress=progress, clock=clock)

    phases: List[Dict[str, Any]] = []
    init = _measure(problem, modules.params_dict(model), **common)
    phases.append({"phase": "init", **init})
    t = clock.now()
    last = _train(model, loss_fn, batches, args.steps, args.lr, progress)
    train_s = clock.now() - t
    trained = _measure(problem, modules.params_dict(model), **common)
    trained["seconds"] = OrderedDict([("training", train_s), *trained["seconds"].items()])
    phases.append({"phase": f"after {args.steps} steps", **trained})

    return {
        "model": name,
        "num_params": num_params,
        "num_batches": len(batches),
        "device": str(device),
        "dtype": args.dtype,
        "seed": args.seed,
        "steps": args.steps,
        "last_train_loss": last,
        "exact": {
            "mode": args.exact,
            "limit": args.exact_limit,
            "computed": all(p["exact"]["computed"] for p in phases),
            "engine": phases[0]["exact"]["engine"],
        },
        "phases": phases,
        "seconds": {"setup": setup_s},
    }


# ---------------------------------------------------------------------------
# printing


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 or x == 0 else f"{x:.3e}"


def _format_report(report: Dict[str, Any]) -> str:
    """The human-readable table of a report made by :func:`_run_report`."""
    phases = report["phases"]
    width = max(16, *(len(p["phase"]) for p in phases))
    lines = [
        f"secorder report: {report['model']}",
        f"  {report['num_params']} parameters, {report['num_batches']} batch(es), "
        f"device {report['device']}, {report['dtype']}, seed {report['seed']}",
    ]
    first = phases[0]["exact"]
    if first["computed"]:
        how = ("structured engine (curvature backpropagation)" if first["engine"] == "structured"
               else f"one-hot HVPs, one per parameter (structured engine: {first['structured_fallback_reason']})")
        lines.append(f"  exact curvature: {how}")
    else:
        lines.append(f"  exact curvature skipped: {first['reason']}")
    lines.append("")

    def row(label: str, values: Sequence[str]) -> str:
        return f"  {label:<30}" + "".join(f"{v:>{width + 2}}" for v in values)

    lines.append(row("", [p["phase"] for p in phases]))
    lines.append(row("loss", [_fmt(p["loss"]) for p in phases]))
    lines.append(row("Hessian trace (exact)", [_fmt(p["exact_trace"]) for p in phases]))
    st = [p["stochastic_trace"] for p in phases]
    lines.append(row(f"Hessian trace ({st[0]['method']})", [_fmt(s["estimate"]) for s in st]))
    lines.append(row("  95% interval", [f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]" for s in st]))
    lines.append(row("  matvecs", [str(s["matvecs"]) for s in st]))
    lines.append(f"  per-layer trace ({phases[0]['per_layer_source']})")
    for layer in phases[0]["per_layer_trace"]:
        lines.append(row(f"    {layer}", [_fmt(p["per_layer_trace"][layer]) for p in phases]))
    lines.append(f"  Hessian diagonal ({phases[0]['diagonal']['source']})")
    for key in ("min", "median", "max"):
        lines.append(row(f"    {key}", [_fmt(p["diagonal"][key]) for p in phases]))
    lines.append(row("    negative entries", [f"{100 * p['diagonal']['negative_share']:.1f}%" for p in phases]))
    lines.append("  wall time (s)")
    keys: List[str] = []
    for p in phases:
        keys += [k for k in p["seconds"] if k not in keys]
    for key in keys:
        lines.append(row(f"    {key}", [f"{p['seconds'][key]:.3f}" if key in p["seconds"] else "-" for p in phases]))
    return "\n".join(lines)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``secorder`` console script; returns the exit status.

    Example:
        >>> from secorder.cli import main
        >>> main(["report", "--model", "no_such_module_xyz:make"])  # the error goes to stderr
        2
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["report", *argv]  # `report` is the default command
    args = parser.parse_args(argv)
    try:
        report = _run_report(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"secorder: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secorder: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"secorder: error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    try:
        print(json.dumps(report, indent=2) if args.json else _format_report(report))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
