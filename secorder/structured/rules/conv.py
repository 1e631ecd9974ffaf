"""Convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``, one rule for all six.

Any stride, padding, dilation, groups (depthwise included) and output padding;
``padding="same"`` and the padding modes other than zeros (reflect, replicate,
circular) run as an explicit padding of the input followed by an unpadded
convolution, as the modules themselves do.

The input Jacobian's transpose is the convolution's input gradient, the same
``aten.convolution_backward`` call autograd makes (all columns folded into one
batch), followed by the transpose of the explicit padding if there is one.

The weight diagonal is ``sum_{k, n} w_kn (B_kn X_n^T)**2`` with the input's
patches ``X`` (Dangel, Kunstner, Hennig, "BackPACK: Packing more into
backprop", ICLR 2020, App. A): ``X[n, c, k, q]`` is the derivative of the
output at position ``q`` with respect to the weight of input channel ``c`` and
kernel offset ``k``. For a convolution the patches are the unfolded input
(sliding windows, strided views of the padded input); for a transposed
convolution, the windows of the input spread out by the stride (the
transposed convolution as a convolution with the flipped kernel). The diagonal is then the channel-block quadratic form
:meth:`~secorder.structured.curvature.Curvature.quadratic` of the patches of
each output channel's group (the same for every output channel when
``groups=1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from ..curvature import Curvature, Factor, Gathered
from ..errors import Unsupported
from ..jacobians import Columns, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["ConvRule", "ConvState", "unfold"]

# module type: (spatial dims, transposed)
_KINDS = {
    nn.Conv1d: (1, False), nn.Conv2d: (2, False), nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True), nn.ConvTranspose2d: (2, True), nn.ConvTranspose3d: (3, True),
}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _windows(x: Tensor, kernel: Tuple[int, ...], stride: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tensor:
    """``[N, C, *S]`` (already padded) to ``[N, C, prod(kernel), P]``: every window, as strided views and one copy."""
    d = len(kernel)
    N, C = x.shape[:2]
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])  # window dims go last
    if any(di > 1 for di in dilation):
        x = x[(Ellipsis,) + tuple(slice(None, None, di) for di in dilation)]
    out_pos = tuple(x.shape[2:2 + d])
    x = x.permute((0, 1) + tuple(range(2 + d, 2 + 2 * d)) + tuple(range(2, 2 + d)))
    return x.reshape(N, C, math.prod(kernel), math.prod(out_pos))


def unfold(x: Tensor, kernel: Tuple[int, ...], stride: Tuple[int, ...], padding: Tuple[int, ...],
           dilation: Tuple[int, ...]) -> Tensor:
    """The patches of a convolution: ``[N, C, *S]`` to ``[N, C, prod(kernel), P]`` (``P`` output positions).

    Example:
        >>> x = torch.arange(4.).reshape(1, 1, 4)
        >>> unfold(x, (2,), (2,), (0,), (1,))
        tensor([[[[0., 2.],
                  [1., 3.]]]])
    """
    if any(padding):
        x = F.pad(x, [p for pi in reversed(padding) for p in (pi, pi)])
    return _windows(x, kernel, stride, dilation)


def _insert_zeros(x: Tensor, dim: int, stride: int) -> Tensor:
    """``stride - 1`` zeros between consecutive entries of ``x`` along ``dim``."""
    if stride == 1:
        return x
    shape = tuple(x.shape)
    zeros = x.new_zeros(shape[:dim + 1] + (stride - 1,) + shape[dim + 1:])
    out = torch.cat([x.unsqueeze(dim + 1), zeros], dim + 1).reshape(shape[:dim] + (-1,) + shape[dim + 1:])
    return out.narrow(dim, 0, (shape[dim] - 1) * stride + 1)


def _transposed_windows(x: Tensor, kernel: Tuple[int, ...], stride: Tuple[int, ...], padding: Tuple[int, ...],
                        output_padding: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tensor:
    """The patches of a transposed convolution, ``[N, C, *S]`` to ``[N, C, prod(kernel), P]``, in reversed kernel order.

    A transposed convolution is the convolution, with stride 1 and the kernel
    flipped, of its input with ``stride - 1`` zeros inserted between entries and
    ``dilation * (kernel - 1) - padding`` added on each side (plus the output
    padding on the far side): its patches are that input's windows. They are
    returned in reversed kernel order, which the rule reads against the flipped
    kernel without a copy.

    Example:
        >>> x = torch.tensor([[[1., 2.]]])
        >>> _transposed_windows(x, (2,), (2,), (0,), (0,), (1,)).flip(2)
        tensor([[[[1., 0., 2., 0.],
                  [0., 1., 0., 2.]]]])
    """
    d = len(kernel)
    for i in range(d):
        x = _insert_zeros(x, 2 + i, stride[i])
    pads = []
    for i in reversed(range(d)):
        edge = dilation[i] * (kernel[i] - 1) - padding[i]
        pads += [edge, edge + output_padding[i]]
    return _windows(F.pad(x, pads), kernel, (1,) * d, dilation)


@dataclass
class ConvState:
    x: Tensor  # the input the kernel slides over (explicitly padded when the module pads it itself)
    weight: Tensor
    out_shape: Tuple[int, ...]
    unpad: Optional[Callable[[Tensor], Tensor]]  # columns at the padded input to the module input


class ConvRule(Rule[ConvState]):
    parameters = ("weight", "bias")

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        m = module
        self.dims, self.transposed = _KINDS[type(m)]
        if not self.transposed and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            # The module pads the input itself, then convolves without padding.
            pads = tuple(m._reversed_padding_repeated_twice)
            self.pre_pad = pads if any(pads) else None
            self.pad_mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            self.padding = (0,) * self.dims
        else:
            self.pre_pad, self.pad_mode, self.padding = None, "constant", tuple(m.padding)
        self.output_padding = tuple(m.output_padding) if self.transposed else (0,) * self.dims

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ConvState]:
        m = self.module
        if x.dim() != self.dims + 2:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (only batched [N, C, *spatial])")
        W = tensors["weight"]
        unpad = None
        if self.pre_pad is not None:
            pads = self.pre_pad
            if self.pad_mode == "constant":
                unpad = lambda B: F.pad(B, [-p for p in pads])  # noqa: E731 (the transpose of a zero padding is a crop)
                x = F.pad(x, pads)
            else:
                x, pullback = vjp(lambda t: F.pad(t, pads, mode=self.pad_mode), x)
                unpad = vmap(lambda b: pullback(b)[0])
        if self.transposed:
            z = _CONV_T[self.dims](x, W, tensors.get("bias"), m.stride, self.padding, self.output_padding, m.groups,
                                   m.dilation)
        else:
            z = _CONV[self.dims](x, W, tensors.get("bias"), m.stride, self.padding, m.dilation, m.groups)
        return z, ConvState(x, W, tuple(z.shape), unpad)

    def jacobian(self, state: ConvState) -> Jacobian:
        m = self.module
        in_feat = tuple(state.x.shape[1:])

        def t_columns(B: Tensor) -> Tensor:
            K, N = B.shape[:2]
            fold = B.reshape((K * N,) + tuple(B.shape[2:]))
            like = fold.new_empty(1).expand((K * N,) + in_feat)  # only its shape is read
            gx = torch.ops.aten.convolution_backward(
                fold, like, state.weight, None, list(m.stride), list(self.padding), list(m.dilation),
                self.transposed, list(self.output_padding), m.groups, (True, False, False))[0]
            gx = gx.reshape((K, N) + in_feat)
            return gx if state.unpad is None else state.unpad(gx)

        return Columns(t_columns)

    def patches(self, x: Tensor) -> Tensor:
        """``[N, C_in, prod(kernel), P]``: the output's derivatives with respect to the weight (see the module docstring).

        For a transposed convolution the kernel offsets come in reversed order.
        """
        m = self.module
        if self.transposed:
            return _transposed_windows(x, m.kernel_size, m.stride, self.padding, self.output_padding, m.dilation)
        return unfold(x, m.kernel_size, m.stride, self.padding, m.dilation)

    def _transposed_weight_diagonal(self, state: ConvState, terms) -> Optional[Tensor]:
        """The weight diagonal of a transposed convolution from explicit columns, without its patches.

        A transposed convolution's weight gradient for a column ``b`` at its output is
        ``sum_i x[:, i] (windows of b at input position i)^T``: the columns' own
        patches (``unfold`` with the module's stride, padding and dilation, one window
        per input position) against the input, ``C_in x P_in x (C_out K)`` per column
        and sample. The input's patches would spread the input out by the stride
        (``stride^d`` times more positions, most of them zeros) and read them again for
        every output channel of a max-pooled (gathered) term. ``None`` where the
        windows do not line up with the input positions (an output padding of a
        stride or more).
        """
        m = self.module
        x = state.x
        N, C_in = x.shape[:2]
        P_in = math.prod(x.shape[2:])
        G = m.groups
        total = None
        for term in terms:
            f = term.as_factor()
            B, w = f.B, f.w  # [K, N, C_out, *S_out], [K, N]
            K, C_out = B.shape[0], B.shape[2]
            U = unfold(B.reshape((K * N,) + tuple(B.shape[2:])), m.kernel_size, m.stride, self.padding, m.dilation)
            if U.shape[-1] != P_in:
                return None
            Kk = U.shape[2]
            U = U.reshape(K, N, G, (C_out // G) * Kk, P_in)
            gW = torch.einsum("ngip,kngjp->kngij", x.reshape(N, G, C_in // G, P_in), U)  # per column and sample
            sq = gW * gW if w is None else gW * gW * w.reshape(K, N, 1, 1, 1)
            d = sq.sum((0, 1))  # [G, C_in / G, (C_out / G) K]
            total = d if total is None else total + d
        if total is None:
            return None
        return total.reshape(state.weight.shape)

    def parameter_diagonal(self, state: ConvState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        out = {}
        P = math.prod(state.out_shape[2:])
        rest = curv
        if "weight" in wanted and self.transposed:
            columns = [t for t in curv.terms if isinstance(t, (Factor, Gathered))]
            d = self._transposed_weight_diagonal(state, columns) if columns else None
            if d is not None:
                out["weight"] = d
                rest = Curvature([t for t in curv.terms if not isinstance(t, (Factor, Gathered))])
        if "weight" in wanted and rest.terms:
            X = self.patches(state.x)  # [N, C_in, K, P]
            N, C_in, K = X.shape[:3]
            G, C_out = self.module.groups, state.out_shape[1]
            J, per_group = (C_in // G) * K, C_out // G
            if G == 1:  # the same test vectors for every output channel
                X = X.reshape(N, 1, J, P)
            else:  # each output channel reads the patches of its group's input channels
                X = X.reshape(N, G, 1, J, P).expand(N, G, per_group, J, P).reshape(N, C_out, J, P)
            q = rest.quadratic(X)  # [C_out, J]
            if self.transposed:  # weight [C_in, C_out / G, *kernel]; the patches' kernel order reversed
                q = q.reshape(G, per_group, C_in // G, K).flip(3).transpose(1, 2)
            q = q.reshape(state.weight.shape)
            out["weight"] = q if "weight" not in out else out["weight"] + q
        if "bias" in wanted:
            out["bias"] = curv.quadratic(state.x.new_ones((1, 1, 1, P)))[:, 0]
        return out


for _t in _KINDS:
    register_rule(_t, ConvRule)
