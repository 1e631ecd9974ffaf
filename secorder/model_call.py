"""How :class:`secorder.FunctionalLoss` calls a model, and which part of its return the loss sees.

Two conventions, each in one place, so that every engine (the generic operator
path, the structured engine's module walker, a graph walker that exports the
model) calls a model the same way:

* **inputs** (:func:`model_arguments`): a mapping is passed as keyword
  arguments, ``model(**inputs)`` (a Hugging Face batch: ``input_ids``,
  ``attention_mask``, ``pixel_values``, ...); a tuple as positional arguments,
  ``model(*inputs)``; anything else (a tensor) as the one argument,
  ``model(inputs)``.
* **output** (:func:`select_output`): what ``loss_fn`` sees of the model's
  return value. ``output=None``: a tensor as it is; a mapping with a ``logits``
  entry (a Hugging Face ``ModelOutput``) its logits; any other return value
  unchanged. ``output="name"``: that entry of a mapping, or that attribute (a
  named tuple, a dataclass). ``output=callable``: ``output(returned)``. A named
  or computed output must be a tensor.

Example:
    >>> import torch
    >>> model_arguments({"input_ids": torch.zeros(2, 3)})[1].keys()
    dict_keys(['input_ids'])
    >>> model_arguments((torch.ones(1), torch.zeros(1)))[0]
    (tensor([1.]), tensor([0.]))
    >>> select_output({"loss": torch.tensor(1.), "logits": torch.ones(2)}, None)
    tensor([1., 1.])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from torch import Tensor

__all__ = ["Output", "model_arguments", "check_output", "select_output", "describe"]

#: What ``output=`` may be: ``None``, a field name, or a function of the model's return value.
Output = Optional[Union[str, Callable[[Any], Tensor]]]

DEFAULT_FIELD = "logits"

#: Where models return their key/value cache (Hugging Face ``transformers`` 5 calls it ``cache``).
CACHE_FIELDS = ("cache", "past_key_values", "cache_params")

_CACHE_HINT = (
    "; the model also returned its key/value cache (field {field!r}), as a model called with use_cache=True "
    "does: pass use_cache=False with the inputs or set model.config.use_cache = False"
)


def model_arguments(inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``inputs`` as the ``(args, kwargs)`` the model is called with (see the module docstring).

    Args:
        inputs: the ``inputs`` argument of ``f(params, inputs, targets)``.

    Returns:
        ``(args, kwargs)``: ``((), dict(inputs))`` for a mapping, ``(inputs, {})``
        for a tuple, ``((inputs,), {})`` otherwise.

    Example:
        >>> import torch
        >>> model_arguments(torch.ones(2))
        ((tensor([1., 1.]),), {})
        >>> model_arguments({1: torch.ones(2)})
        Traceback (most recent call last):
        ...
        TypeError: inputs is a mapping, passed to the model as keyword arguments, so its keys must be strings; ...
    """
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(
                "inputs is a mapping, passed to the model as keyword arguments, so its keys must be strings; "
                f"got a key of type {type(bad[0]).__name__}")
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def check_output(output: Any) -> None:
    """Validate ``output=`` when the loss is built.

    Example:
        >>> check_output("logits"); check_output(None); check_output(lambda out: out[0])
        >>> check_output(3)
        Traceback (most recent call last):
        ...
        TypeError: output must be None, a field name (str) or a callable applied to the model's return value, got int
    """
    if output is None or callable(output):
        return
    if not isinstance(output, str):
        raise TypeError(
            "output must be None, a field name (str) or a callable applied to the model's return value, "
            f"got {type(output).__name__}")
    if not output:
        raise ValueError("output must name a field of the model's return value (such as 'logits'), got ''")


def describe(value: Any) -> str:
    """A short description of a value for an error message.

    Example:
        >>> import torch
        >>> describe(torch.ones(2, 3)), describe((1, 2))
        ('a tensor of shape (2, 3) and dtype torch.float32', 'a tuple of length 2')
    """
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _fields(value: Any) -> Optional[List[str]]:
    """The names a field may be taken by, or ``None`` for a value without named fields."""
    if isinstance(value, Mapping):
        return [str(k) for k in value.keys()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(value._fields)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    return None


def _cache_field(returned: Any) -> Optional[str]:
    """The field of ``returned`` that holds a key/value cache, if any (read without touching deprecated aliases)."""
    if not isinstance(returned, Mapping):
        return None
    keys = [str(k) for k in returned.keys()]
    return next((k for k in CACHE_FIELDS if k in keys), None)


def _field(returned: Any, name: str) -> Any:
    fields = _fields(returned)
    if fields is None:
        raise ValueError(
            f"output={name!r}: the model returned {describe(returned)}, which has no named fields; "
            "leave output=None for a model that returns its output tensor, or pass a callable")
    if isinstance(returned, Mapping):
        if name in returned:
            return returned[name]
    elif name in fields:
        return getattr(returned, name)
    unset = ("; a Hugging Face ModelOutput holds only the fields the model set (hidden states and attention "
             "weights need output_hidden_states=True or output_attentions=True with the inputs)"
             if name.endswith(("hidden_states", "attentions")) else "")
    raise ValueError(
        f"output={name!r}: the model returned a {type(returned).__name__} with the fields {fields}, "
        f"none named {name!r}; pass output= one of them, or a callable{unset}")


def select_output(returned: Any, output: Output) -> Any:
    """What ``loss_fn`` sees of the model's return value ``returned`` (see the module docstring).

    Args:
        returned: what the model returned.
        output: ``None``, a field name, or a callable (``FunctionalLoss``'s ``output``).

    Returns:
        The selected output: a tensor, except with ``output=None`` for a return
        value that is neither a tensor nor a mapping (passed on unchanged).

    Raises:
        ValueError: ``output`` names a field the return value does not have (the
            error lists the fields it has).
        TypeError: the named field, or the callable's result, is not a tensor.

    Example:
        >>> import torch
        >>> select_output({"logits": torch.ones(1), "hidden": torch.zeros(1)}, "hidden")
        tensor([0.])
        >>> select_output({"loss": torch.ones(())}, None)
        Traceback (most recent call last):
        ...
        ValueError: output=None takes the field 'logits' ... returned a dict with the fields ['loss']; ...
    """
    if output is None:
        if isinstance(returned, Tensor) or not isinstance(returned, Mapping):
            return returned
        if DEFAULT_FIELD not in returned:
            raise ValueError(
                f"output=None takes the field {DEFAULT_FIELD!r} of a model that returns a mapping, but the model "
                f"returned a {type(returned).__name__} with the fields {_fields(returned)}; pass output= the "
                "name of the field the loss takes, or a callable")
        value, what = returned[DEFAULT_FIELD], f"output=None: the field {DEFAULT_FIELD!r} is"
    elif isinstance(output, str):
        value, what = _field(returned, output), f"output={output!r}: the field is"
    else:
        value = output(returned)
        what = f"the output callable {getattr(output, '__name__', type(output).__name__)} returned"
    if not isinstance(value, Tensor):
        cache = _cache_field(returned)
        raise TypeError(
            f"{what} {describe(value)}, not a tensor (the model output that loss_fn takes)"
            + (_CACHE_HINT.format(field=cache) if cache is not None else ""))
    return value
