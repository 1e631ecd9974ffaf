"""Loading the user's problem: ``--model`` to a factory, its result checked and moved to the device.

A factory is a callable with no arguments returning ``(model, loss_fn, data)``:
``model`` an ``nn.Module``, ``loss_fn(outputs, targets)`` a scalar loss, and
``data`` either one batch ``(inputs, targets)`` or an iterable of such batches
(at most ``--max-batches`` are read). ``--model`` names it as
``path/to/file.py:factory`` or ``pkg.module:factory``; without ``--model`` the
commands use :func:`digits_mlp`. Every mistake is a :class:`UsageError` whose
message starts with ``--model ...``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import itertools
import os
import re
import sys
from typing import Any, Callable, Iterable, List, NamedTuple, Tuple

import torch
from torch import Tensor, nn

from .errors import UsageError

__all__ = ["digits_mlp", "load_factory", "Problem", "load_problem"]

Batch = Tuple[Any, Any]
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_EXPECTED = "'path/to/file.py:factory' or 'pkg.module:factory'"


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
            "the default problem needs scikit-learn: pip install scikit-learn "
            "(from a checkout: pip install -e \".[cli]\"), or pass --model FILE.py:FACTORY"
        ) from exc
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return model, nn.functional.cross_entropy, (inputs, targets)


def _import_file(target: str, path: str) -> Any:
    """Execute the Python file ``path`` as a fresh module (its folder goes on ``sys.path`` for its own imports)."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise UsageError(f"--model {target}: {path!r} is a folder; expected a Python file (path/to/file.py:factory)")
    if not os.path.isfile(full):
        raise UsageError(f"--model {target}: no file {path!r} (looked for {full})")
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"secorder_model_{stem}"  # never shadows an installed module of the same name
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise UsageError(f"--model {target}: cannot load {path!r} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"--model {target}: running {path!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(target: str, module_name: str, attr: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a module next to you is found
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            as_file = module_name.replace(".", os.sep) + ".py"
            raise UsageError(
                f"--model {target}: no module {module_name!r} on the Python path (and no file {as_file!r} here); "
                f"pass a file as path/to/file.py:{attr} or an importable module as pkg.module:{attr}"
            ) from exc
        raise UsageError(f"--model {target}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # a syntax error, or anything the module raises at import
        raise UsageError(f"--model {target}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def load_factory(target: str) -> Callable[[], Any]:
    """Resolve ``"path/to/file.py:factory"`` or ``"pkg.module:factory"`` to a callable.

    A target whose part before the last ``:`` ends in ``.py`` or contains a path
    separator is a file, run as a fresh module; anything else is imported as a
    module, with the current directory searched first (as ``python -m`` does),
    so ``--model problem:make`` finds a ``problem.py`` next to you. Every failure
    is a :class:`UsageError` that names the target and says what to pass instead.

    Example:
        >>> from secorder.cli import load_factory
        >>> load_factory("secorder.cli:digits_mlp").__name__
        'digits_mlp'
        >>> load_factory("secorder.cli")
        Traceback (most recent call last):
        ...
        secorder.cli.errors.UsageError: --model expects 'path/to/file.py:factory' or 'pkg.module:factory', got 'secorder.cli'
    """
    source, sep, attr = target.rpartition(":")
    if not sep or not source or not _DOTTED.match(attr):
        raise UsageError(f"--model expects {_EXPECTED}, got {target!r}")
    if source.endswith(".py") or "/" in source or os.sep in source:
        module, what = _import_file(target, source), f"file {source!r}"
    elif _DOTTED.match(source):
        module, what = _import_module(target, source, attr), f"module {source!r}"
    else:
        raise UsageError(f"--model {target}: {source!r} is neither a Python file nor a module name; expected {_EXPECTED}")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--model {target}: {what} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {target}: expected a callable factory, got {type(obj).__name__}")
    return obj


def _is_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _check_result(result: Any, where: str, max_batches: int) -> Tuple[nn.Module, Callable, List[Batch]]:
    """Check a factory's return value and normalise ``data`` to a list of batches."""
    expected = "a tuple (model, loss_fn, data)"
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = (f"a {type(result).__name__} of length {len(result)}" if isinstance(result, (tuple, list))
               else f"a {type(result).__name__}")
        raise UsageError(f"{where} must return {expected}, got {got}")
    model, loss_fn, data = result
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where} returned a model of type {type(model).__name__}; expected a torch.nn.Module")
    if not callable(loss_fn):
        raise UsageError(f"{where} returned a loss_fn of type {type(loss_fn).__name__}; "
                         "expected a callable loss_fn(outputs, targets)")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor) and not isinstance(data[0], Tensor):
        raise UsageError(f"{where} returned data (inputs, targets) whose inputs are a {type(data[0]).__name__}; "
                         "expected a tensor (a model taking several inputs can unpack one tensor or be wrapped)")
    if _is_batch(data):
        batches = [tuple(data)]
    elif isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise UsageError(f"{where} returned data of type {type(data).__name__}; expected a batch (inputs, targets) "
                         "or an iterable of such batches")
    else:
        batches = []
        for i, batch in enumerate(itertools.islice(iter(data), max_batches)):
            if not _is_batch(batch):
                raise UsageError(f"{where}: batch {i} of data is a {type(batch).__name__}; expected a pair "
                                 "(inputs, targets) whose inputs are a tensor")
            batches.append(tuple(batch))
        if not batches:
            raise UsageError(f"{where} returned an empty iterable of batches")
    for i, (inputs, _) in enumerate(batches):
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise UsageError(f"{where}: batch {i} has no examples (inputs of shape {tuple(inputs.shape)})")
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
    try:
        with torch.no_grad():
            out = loss_fn(model(batch[0]), batch[1])
    except Exception as exc:
        raise UsageError(f"{where}: computing loss_fn(model(inputs), targets) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Tensor):
        raise UsageError(f"{where}: loss_fn returned a {type(out).__name__}; expected a scalar tensor")
    if out.ndim != 0:
        raise UsageError(f"{where}: loss_fn returned a tensor of shape {tuple(out.shape)}; expected a scalar (0-dim) "
                         "loss (use reduction='mean')")
    if not out.is_floating_point():
        raise UsageError(f"{where}: loss_fn returned a {out.dtype} tensor; expected a floating-point loss")


class Problem(NamedTuple):
    """A loaded, checked problem on its device: the model is in eval mode and ``batches`` is a non-empty list."""

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    batches: List[Batch]


def load_problem(model: Any, *, max_batches: int, device: torch.device, dtype: torch.dtype, seed: int) -> Problem:
    """Seed torch, call the factory named by ``--model`` (``None``: :func:`digits_mlp`) and check what it returns.

    ``torch.manual_seed(seed)`` runs first, so a factory that initialises at
    random is reproducible.

    Example:
        >>> import torch
        >>> p = load_problem("secorder.cli:digits_mlp", max_batches=1, device=torch.device("cpu"),
        ...                  dtype=torch.float64, seed=0)  # doctest: +SKIP
        >>> p.batches[0][0].dtype, p.model.training  # doctest: +SKIP
        (torch.float64, False)
    """
    torch.manual_seed(seed)
    if model is None:
        where, factory = "the default problem", digits_mlp
        name = "digits-mlp (64-32-10 tanh, scikit-learn digits)"
    else:
        where, name = f"--model {model}", model
        factory = load_factory(model)
    try:
        result = factory()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from exc
    module, loss_fn, batches = _check_result(result, where, max_batches)
    module = module.to(device=device, dtype=dtype)
    batches = [_to(b, device, dtype) for b in batches]
    module.eval()
    _check_scalar_loss(module, loss_fn, batches[0], where)
    return Problem(name, module, loss_fn, batches)
