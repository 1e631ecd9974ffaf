"""Option types and the options every command about a model shares.

Every type below turns a bad value into ``argparse.ArgumentTypeError`` with a
short reason, so argparse prints ``secorder CMD: error: argument --lr: expected a
positive finite number, got 'nan'`` under the command's usage and exits with 2.

Example:
    >>> positive_float("0.5"), nonneg_int("0"), positive_int("3")
    (0.5, 0, 3)
    >>> positive_float("nan")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a positive finite number, got 'nan'
"""

from __future__ import annotations

import argparse
import math
from typing import Dict

import torch

from .errors import UsageError

__all__ = ["positive_int", "nonneg_int", "positive_float", "seed", "DTYPES", "add_problem_options", "resolve_device",
           "add_batch_size_option", "DEFAULT_BATCH_SIZE"]

#: ``--batch-size``'s default: most examples per batch of the passes over the data set.
DEFAULT_BATCH_SIZE = 256

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
_MAX_SEED = 2**63 - 1


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed for ``torch.manual_seed``: an integer in [0, 2**63)."""
    value = _int(text, "an integer seed")
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and 2**63 - 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``nan``, ``inf`` and ``-1`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def add_problem_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--max-batches``, ``--device``, ``--dtype`` and ``--seed``: what to load, where, how."""
    parser.add_argument(
        "--model", metavar="FILE.py:FACTORY", default=None,
        help="the problem: a factory with no arguments returning (model, loss_fn, data), given as "
             "path/to/file.py:factory or pkg.module:factory; data is a batch (inputs, targets) or an iterable "
             "of batches (default: an MLP on scikit-learn's handwritten digits)")
    parser.add_argument("--max-batches", type=positive_int, default=16,
                        help="batches read from an iterable data set (default 16)")
    parser.add_argument("--device", default="cpu", help="device to run on, such as cpu or cuda:0 (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="floating-point dtype (default float32)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed for the model's initialisation, training and probes (default 0)")


def add_batch_size_option(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, the same for every command that reads the problem as a data set."""
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="most examples per batch of the passes over the data set; larger batches read from the "
                             f"problem are split (default {DEFAULT_BATCH_SIZE})")


def resolve_device(text: str) -> torch.device:
    """``--device`` as a ``torch.device``, or :class:`UsageError` when it is unknown or unavailable.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu7")
        Traceback (most recent call last):
        ...
        secorder.cli.errors.UsageError: --device: unknown device 'gpu7'
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: unknown device {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available on this machine")
    return device
