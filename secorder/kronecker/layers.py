"""The layers K-FAC understands: one rule per torch function, in a :class:`~secorder.registry.Registry`.

K-FAC sees a layer as a linear map ``y = W x (+ b)`` applied at ``S`` shared
positions of each of ``N`` samples: a ``Linear`` on ``[N, *, D]`` inputs (``S`` the
product of the middle dimensions), a convolution as a ``Linear`` on its input
patches (``S`` the output positions; Grosse and Martens 2016), an ``Embedding`` as
a ``Linear`` on one-hot inputs. A rule turns one intercepted call into that view:

* ``features(call)``: the inputs as ``[N, S, d_in]`` (patches for a convolution),
* ``output_rows(call, g)``: output gradients ``[K, *y.shape]`` as ``[K, N, S, d_out]``,
* ``input_factor(call, approx)``: the unnormalised input factor and its count
  (``expand``: ``sum_{n,s} x x^T`` over ``N S`` rows; ``reduce``: ``sum_n xbar xbar^T``
  over ``N`` rows with ``xbar`` the mean over ``S``; Eschenhagen et al. 2023).

Rules are keyed by the torch function the layer calls (``F.linear``,
``F.conv1d/2d/3d``, ``F.embedding``), so any module or plain function that calls
them is covered, whatever the wiring around it. A new layer type is one rule and
one :meth:`~secorder.registry.Registry.register` call.

References:
    Martens, J., Grosse, R. (2015). Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML.
    Grosse, R., Martens, J. (2016). A Kronecker-factored approximate Fisher matrix for
    convolution layers. ICML.
    Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. (2023).
    Kronecker-factored approximate curvature for modern neural network architectures. NeurIPS.

Example:
    >>> import torch
    >>> rule = RULES.get(torch.nn.functional.conv2d)
    >>> x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    >>> call = Call(rule, 0, None, x, rule.options(dict(input=x, weight=w, stride=1, padding=1, dilation=1,
    ...                                                  groups=1)), w.shape)
    >>> P = rule.features(call)                     # [N, positions, C_in * 3 * 3]
    >>> y = torch.nn.functional.conv2d(x, w, padding=1)
    >>> torch.allclose(P @ w.reshape(4, -1).T, y.flatten(2).transpose(1, 2), atol=1e-5)
    True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry

__all__ = ["Call", "Rule", "RULES", "conv_patches", "gram"]

#: Entries of a dense input factor that an ``Embedding`` may build in ``kfac_approx="reduce"``.
MAX_DENSE_EMBEDDING_FACTOR = 2**26


#: Width from which :func:`gram` computes the upper triangle of blocks only.
_GRAM_BLOCKED_FROM = 256


def gram(X: Tensor) -> Tensor:
    """``X^T X`` for ``X`` of shape ``[rows, d]``, symmetric by construction.

    From ``d = 256`` on, when there are at least as many rows as columns (the product
    is compute-bound), as a 2 x 2 block matrix whose lower block is the transpose of
    the upper one: 3/4 of the multiply-adds of one ``mm`` (no SYRK in PyTorch).

    Example:
        >>> X = torch.randn(5, 300, dtype=torch.float64)
        >>> torch.allclose(gram(X), X.T @ X)
        True
    """
    rows, d = X.shape
    if d < _GRAM_BLOCKED_FROM or rows < d:
        return X.mT @ X
    half = d // 2
    X1, X2 = X[:, :half], X[:, half:]
    out = X.new_empty(d, d)
    out[:half, :half] = X1.mT @ X1
    upper = X1.mT @ X2
    out[:half, half:] = upper
    out[half:, :half] = upper.mT
    out[half:, half:] = X2.mT @ X2
    return out


@dataclass
class Call:
    """One intercepted layer call: which leaves it uses, its input and options.

    Fields:
        rule: the layer's :class:`Rule`.
        weight: the weight's leaf index, or ``None`` (weight not differentiated).
        bias: the bias's leaf index, or ``None``.
        x: the layer input (detached).
        options: the rule's hyper-parameters (stride, padding, ...).
        weight_shape: the weight's shape.
        dtype: the weight's dtype (an Embedding's one-hot inputs take it).
        edge: the gradient edge of the layer output (``None`` when no backward runs).
    """

    rule: "Rule"
    weight: Optional[int]
    bias: Optional[int]
    x: Tensor
    options: Dict[str, Any]
    weight_shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    edge: Any = None


class Rule:
    """How K-FAC sees the calls of one torch function (subclasses below)."""

    name = "layer"
    #: the weight's 2-D view is ``(d_out, d_in)`` (``False``: ``(d_in, d_out)``, the Embedding).
    out_first = True

    def __init__(self, signature_of: Any):
        self.signature = inspect.signature(signature_of)

    def bind(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def unsupported(self, bound: Dict[str, Any]) -> Optional[str]:
        """Why this call is not a K-FAC layer (``None``: it is)."""
        return None

    def options(self, bound: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    def call(self, func: Any, bound: Dict[str, Any], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        args = dict(bound)
        args["weight"], args["bias"] = weight, bias
        return func(**args)

    def label(self, call: Call) -> str:
        return self.name

    # -- K-FAC's view ------------------------------------------------------------------------

    def dims(self, weight_shape: Tuple[int, ...]) -> Tuple[int, int]:
        """``(d_out, d_in)`` of the layer."""
        return weight_shape[0], math.prod(weight_shape[1:])

    def features(self, call: Call) -> Tensor:
        """The layer inputs as ``[N, S, d_in]``."""
        raise NotImplementedError

    def samples(self, call: Call) -> int:
        """``N``: the leading (batch) dimension the layer sees."""
        return self.features(call).shape[0]

    def output_rows(self, call: Call, g: Tensor) -> Tensor:
        """Output gradients ``[K, *y.shape]`` as ``[K, N, S, d_out]``."""
        raise NotImplementedError

    def output_factor(self, call: Call, g: Tensor, approx: str) -> Tensor:
        """``sum g g^T`` over the output-gradient rows of ``g`` (``[K, *y.shape]``), ``d_out x d_out``."""
        rows = self.output_rows(call, g)
        if approx == "reduce":
            rows = rows.sum(2)
        return gram(rows.reshape(-1, rows.shape[-1]))

    def input_factor(self, call: Call, approx: str) -> Tuple[Tensor, int]:
        """The unnormalised input factor and its count of rows (module docstring)."""
        X = self.features(call)
        N, S, d = X.shape
        if approx == "expand":
            return gram(X.reshape(N * S, d)), N * S
        mean = X.mean(1) if S else X.new_zeros(N, d)
        return gram(mean), N


def _signature_linear(input, weight, bias=None):  # noqa: ANN001 - signatures of the torch functions
    pass


def _signature_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: ANN001
    pass


def _signature_embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,  # noqa: ANN001
                         scale_grad_by_freq=False, sparse=False):
    pass


class LinearRule(Rule):
    """``F.linear(x, W, b)``: ``x`` of shape ``[N, *, D]`` (``S`` = the middle dims), ``[D]`` as one sample."""

    name = "Linear"

    def __init__(self) -> None:
        super().__init__(_signature_linear)

    def features(self, call: Call) -> Tensor:
        x = call.x
        d_in = call.weight_shape[1]
        if x.dim() == 1:
            return x.reshape(1, 1, d_in)
        return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), d_in)

    def samples(self, call: Call) -> int:
        return 1 if call.x.dim() == 1 else call.x.shape[0]

    def output_rows(self, call: Call, g: Tensor) -> Tensor:
        K, d_out = g.shape[0], call.weight_shape[0]
        x = call.x
        N, S = (1, 1) if x.dim() == 1 else (x.shape[0], math.prod(x.shape[1:-1]))
        return g.reshape(K, N, S, d_out)


def _tuple(value: Any, d: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    out = tuple(int(v) for v in value)
    return out * d if len(out) == 1 else out


def _padding(padding: Any, kernel: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
    """Left and right padding per spatial dim (PyTorch's ``"same"``: the extra one on the right)."""
    d = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * d
        total = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in _tuple(padding, d))


def conv_patches(x: Tensor, kernel: Tuple[int, ...], stride: Tuple[int, ...], padding: Any,
                 dilation: Tuple[int, ...], groups: int, *, average: bool = False) -> Tensor:
    """Input patches of a ``d``-dimensional convolution, ``[N, O, C_in/groups * prod(kernel)]``.

    Channel groups are averaged (curvlinops' convention: one input factor shared
    by the groups). With ``average=True`` the mean patch over the output positions,
    ``[N, C_in/groups * prod(kernel)]``, computed on a strided view without forming
    the patches.

    Example:
        >>> x = torch.arange(5.).reshape(1, 1, 5)
        >>> conv_patches(x, (3,), (2,), 0, (1,), 1)
        tensor([[[0., 1., 2.],
                 [2., 3., 4.]]])
    """
    d = len(kernel)
    N, C = x.shape[0], x.shape[1]
    if groups > 1:
        x = x.reshape(N, groups, C // groups, *x.shape[2:]).mean(1)
        C = C // groups
    pads = _padding(padding, kernel, dilation)
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]
        x = F.pad(x, flat)
    for i in range(d):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])
    # x: [N, C, O_1..O_d, span_1..span_d]
    if any(dl > 1 for dl in dilation):
        x = x[(Ellipsis,) + tuple(slice(None, None, dl) for dl in dilation)]
    positions = tuple(range(2, 2 + d))
    if average:
        out_count = math.prod(x.shape[2:2 + d])
        mean = x.mean(positions) if out_count else x.new_zeros((N, C) + tuple(kernel))
        return mean.reshape(N, C * math.prod(kernel))
    order = (0,) + positions + (1,) + tuple(range(2 + d, 2 + 2 * d))
    x = x.permute(order)
    return x.reshape(N, math.prod(x.shape[1:1 + d]), C * math.prod(kernel))


class ConvRule(Rule):
    """``F.conv{d}d(x, W, b, stride, padding, dilation, groups)``: a ``Linear`` on the input patches."""

    def __init__(self, d: int) -> None:
        super().__init__(_signature_conv)
        self.d = d
        self.name = f"Conv{d}d"

    def options(self, bound: Dict[str, Any]) -> Dict[str, Any]:
        d = self.d
        return dict(stride=_tuple(bound["stride"], d), padding=bound["padding"] if isinstance(bound["padding"], str)
                    else _tuple(bound["padding"], d), dilation=_tuple(bound["dilation"], d),
                    groups=int(bound["groups"]), batched=bound["input"].dim() == d + 2)

    def _x(self, call: Call) -> Tensor:
        return call.x if call.options["batched"] else call.x.unsqueeze(0)

    def samples(self, call: Call) -> int:
        return call.x.shape[0] if call.options["batched"] else 1

    def features(self, call: Call) -> Tensor:
        o = call.options
        return conv_patches(self._x(call), tuple(call.weight_shape[2:]), o["stride"], o["padding"], o["dilation"],
                            o["groups"])

    def input_factor(self, call: Call, approx: str) -> Tuple[Tensor, int]:
        if approx == "expand":
            return super().input_factor(call, approx)
        o = call.options
        mean = conv_patches(self._x(call), tuple(call.weight_shape[2:]), o["stride"], o["padding"], o["dilation"],
                            o["groups"], average=True)
        return gram(mean), mean.shape[0]

    def output_rows(self, call: Call, g: Tensor) -> Tensor:
        if not call.options["batched"]:
            g = g.unsqueeze(1)
        return g.flatten(3).transpose(2, 3)  # [K, N, O, C_out]

    def output_factor(self, call: Call, g: Tensor, approx: str) -> Tensor:
        """In the gradient's own layout ``[K, N, C_out, O]``: one batched product, no transposed copy."""
        if not call.options["batched"]:
            g = g.unsqueeze(1)
        C = g.shape[2]
        g = g.reshape(g.shape[0] * g.shape[1], C, -1) if g.numel() else g.new_zeros(0, C, 1)
        if approx == "reduce":
            return gram(g.sum(-1))
        return torch.bmm(g, g.mT).sum(0)


class EmbeddingRule(Rule):
    """``F.embedding(idx, W)``: a ``Linear`` on one-hot inputs (exact: same outputs, same gradients).

    The weight ``[V, D]`` is the transposed ``Linear`` weight, so its block is
    ``A (x) G`` with ``A`` the (diagonal, in ``expand``) one-hot covariance: the token
    counts over ``N S`` rows (``padding_idx`` rows receive no gradient and count 0).
    ``max_norm`` (which renormalises the weight in place) and ``scale_grad_by_freq``
    (whose gradient is not a one-hot ``Linear``'s) are refused.
    """

    name = "Embedding"
    out_first = False

    def __init__(self) -> None:
        super().__init__(_signature_embedding)

    def unsupported(self, bound: Dict[str, Any]) -> Optional[str]:
        if bound["max_norm"] is not None:
            return "Embedding with max_norm (it renormalises the weight in place)"
        if bound["scale_grad_by_freq"]:
            return "Embedding with scale_grad_by_freq (its gradient is not a one-hot Linear's)"
        return None

    def options(self, bound: Dict[str, Any]) -> Dict[str, Any]:
        num = bound["weight"].shape[0]
        pad = bound["padding_idx"]
        if pad is not None and pad < 0:
            pad += num
        return dict(padding_idx=pad)

    def call(self, func: Any, bound: Dict[str, Any], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        args = dict(bound)
        args["weight"] = weight
        return func(**args)

    def dims(self, weight_shape: Tuple[int, ...]) -> Tuple[int, int]:
        return weight_shape[1], weight_shape[0]

    def indices(self, call: Call) -> Tensor:
        """The token indices as ``[N, S]``."""
        idx = call.x
        if idx.dim() <= 1:
            return idx.reshape(1, idx.numel())
        return idx.reshape(idx.shape[0], math.prod(idx.shape[1:]))

    def samples(self, call: Call) -> int:
        return self.indices(call).shape[0]

    def kept(self, call: Call, idx: Tensor) -> Tensor:
        pad = call.options["padding_idx"]
        return torch.ones_like(idx, dtype=torch.bool) if pad is None else idx != pad

    def features(self, call: Call) -> Tensor:
        idx = self.indices(call)
        V, dtype = call.weight_shape[0], call.dtype
        onehot = F.one_hot(idx.long(), V).to(dtype)
        return onehot * self.kept(call, idx).unsqueeze(-1).to(dtype)

    def input_factor(self, call: Call, approx: str) -> Tuple[Tensor, int]:
        idx = self.indices(call)
        dtype = call.dtype
        N, S = idx.shape
        V = call.weight_shape[0]
        if approx == "expand":  # diagonal: one count per token
            flat = idx.reshape(-1).long()
            keep = self.kept(call, idx).reshape(-1).to(dtype)
            counts = torch.zeros(V, dtype=dtype, device=idx.device).index_add_(0, flat, keep)
            return counts, N * S
        if V * V > MAX_DENSE_EMBEDDING_FACTOR:
            raise ValueError(
                f"kfac_approx='reduce' gives an Embedding with {V} rows a dense {V}x{V} input factor "
                f"({V * V} entries, more than {MAX_DENSE_EMBEDDING_FACTOR}); use kfac_approx='expand', whose "
                "factor is diagonal, or leave the embedding out of params")
        mean = self.features(call).mean(1) if S else torch.zeros(N, V, dtype=dtype, device=idx.device)
        return gram(mean), N

    def output_rows(self, call: Call, g: Tensor) -> Tensor:
        K, d_out = g.shape[0], call.weight_shape[1]
        N, S = self.indices(call).shape
        return g.reshape(K, N, S, d_out)


def _describe_function(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


RULES: Registry[Rule] = Registry("K-FAC layer", describe=_describe_function)
RULES.register(F.linear, LinearRule())
for _d, _fn in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    RULES.register(_fn, ConvRule(_d))
RULES.register(F.embedding, EmbeddingRule())
