"""The result of ``so.kfac`` / ``so.ekfac``: a Kronecker-factored curvature with its linear algebra.

A :class:`KroneckerCurvature` ``K`` is block diagonal over the parameter leaves
(curvlinops' ``separate_weight_and_bias=True``): the weight of a layer has the
block ``G (x) A`` on its ``d_out x d_in`` view (``A (x) G`` on an Embedding's
``[V, D]`` weight, the transposed ``Linear``), its bias the block ``G``. Per layer
it holds the input-covariance factor ``A`` and the output-gradient factor ``G``
(K-FAC), or the factors' eigenvectors and the corrected eigenvalues (EK-FAC, and
every damped inverse). Everything is computed from those factors, once:

* :meth:`~KroneckerCurvature.mv` ``K v``, :meth:`~KroneckerCurvature.solve`
  ``(K + damping I)^-1 v`` (exact damping, through the eigendecompositions),
  :meth:`~KroneckerCurvature.inverse` (the same kind of object, for repeated solves);
* :meth:`~KroneckerCurvature.diagonal`, :meth:`~KroneckerCurvature.trace`,
  :meth:`~KroneckerCurvature.logdet`, :meth:`~KroneckerCurvature.eigenvalues` (all of
  them) and :meth:`~KroneckerCurvature.to_dense` (small models, tests).

Vectors are pytrees shaped like the parameters; dense matrices and eigenvalue
lists follow :func:`secorder.tree.ravel`'s order (a dict's keys sorted). ``K`` is a
pytree (its tensors are the children; registered with :mod:`secorder.tree` and
``torch.utils._pytree``), so it can be saved, mapped and moved like a dict of tensors.
Computing ``K`` runs outside ``torch.func`` transforms (it reads autograd's graph).
Factors' eigendecompositions are made on first use and cached in ``K``.

Example:
    >>> import torch, secorder as so
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
    >>> params, x, y = so.params_dict(model), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> K = so.kfac(f)(params, x, y)
    >>> K
    KroneckerCurvature(kfac, 2 layers (2 Linear), 26 parameters, fisher_type='type-2', kfac_approx='expand')
    >>> v = {k: torch.randn_like(t) for k, t in params.items()}
    >>> w = K.solve(so.tree.axpy(1e-3, v, K.mv(v)), damping=1e-3)     # (K + 1e-3 I)^-1 (K + 1e-3 I) v
    >>> all(torch.allclose(w[k], v[k], atol=1e-3) for k in v)
    True
    >>> torch.allclose(K.trace(), K.to_dense().trace())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import tree
from .blocks import EigenBlock, KronBlock

__all__ = ["KroneckerCurvature", "Layer", "LayerInfo", "check_damping"]


@dataclass(frozen=True)
class LayerInfo:
    """What a layer is (static): its name, kind, leaves and shapes.

    Fields:
        name: the layer's name (its weight's name without ``.weight``).
        kind: ``"Linear"``, ``"Conv2d"``, ``"Embedding"``, ...
        weight: the weight's leaf index (``None``: the weight is not differentiated).
        bias: the bias's leaf index (``None``: no differentiated bias).
        d_out: output features (``G`` is ``d_out x d_out``).
        d_in: input features of the ``Linear`` view (``A`` is ``d_in x d_in``).
        out_first: the weight's 2-D view is ``(d_out, d_in)`` (``False``: ``(d_in, d_out)``, an Embedding).
        calls: how many calls of the layer the factors sum over.
    """

    name: str
    kind: str
    weight: Optional[int]
    bias: Optional[int]
    d_out: int
    d_in: int
    out_first: bool = True
    calls: int = 1


@dataclass
class Layer:
    """One layer's factors: ``A``, ``G`` (K-FAC) or ``QA``, ``QG``, ``S_weight``, ``S_bias`` (eigen form).

    ``A`` is a vector for a diagonal factor (an Embedding's token counts in
    ``kfac_approx="expand"``); ``QA`` is then ``None`` (the identity). ``S_weight``
    is shaped like the weight's 2-D view, ``S_bias`` like the bias.
    """

    info: LayerInfo
    A: Optional[Tensor] = None
    G: Optional[Tensor] = None
    QA: Optional[Tensor] = None
    QG: Optional[Tensor] = None
    S_weight: Optional[Tensor] = None
    S_bias: Optional[Tensor] = None
    eigen_form: bool = False

    FIELDS = ("A", "G", "QA", "QG", "S_weight", "S_bias")

    def tensors(self) -> List[Optional[Tensor]]:
        return [getattr(self, k) for k in self.FIELDS]

    def blocks(self, cache: dict) -> List[Tuple[int, Any]]:
        """``(leaf index, block)`` for the layer's weight and bias."""
        info, out = self.info, []
        if info.weight is not None:
            if self.eigen_form:
                QL, QR = (self.QG, self.QA) if info.out_first else (self.QA, self.QG)
                out.append((info.weight, EigenBlock(QL, QR, self.S_weight)))
            else:
                L, R = (self.G, self.A) if info.out_first else (self.A, self.G)
                out.append((info.weight, KronBlock(L, R, cache)))
        if info.bias is not None:
            if self.eigen_form:
                out.append((info.bias, EigenBlock(self.QG, None, self.S_bias.unsqueeze(-1))))
            else:
                out.append((info.bias, KronBlock(self.G, None, cache)))
        return out


def check_damping(damping: Any, name: str = "damping") -> float:
    """``damping`` must be a finite number >= 0 (a Python number or a 0-dim tensor).

    Example:
        >>> check_damping(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a finite number >= 0, got -1.0
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float >= 0, got {type(damping).__name__}")
    if isinstance(damping, Tensor):
        if damping.dim() != 0 or not (damping.is_floating_point() or not damping.is_complex()):
            raise TypeError(f"{name} must be a float or a 0-dim tensor, got a tensor of shape {tuple(damping.shape)}")
        damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {damping}")
    return float(damping)


class KroneckerCurvature:
    """A Kronecker-factored curvature of a model's parameters (module docstring).

    Made by :func:`secorder.kfac` and :func:`secorder.ekfac`; not constructed by hand.

    Attributes:
        layers: the :class:`Layer` s, in the order the model first calls them.
        method: ``"kfac"``, ``"ekfac"``, or ``"inverse"`` for a damped inverse.
        fisher_type: as given to the transform.
        kfac_approx: as given to the transform.
        damping: the damping of an inverse (``None`` otherwise).
        engine: ``"kronecker"``, the route that made it: the layers' inputs and
            output gradients collected in one forward and backward pass per batch
            (the structured and generic engines of the other transforms do not apply).
    """

    engine: str = "kronecker"

    def __init__(self, layers: Sequence[Layer], spec: Any, shapes: Sequence[Tuple[int, ...]],
                 names: Sequence[str], info: Dict[str, Any]):
        self.layers = tuple(layers)
        self._spec = spec
        self._shapes = tuple(tuple(s) for s in shapes)
        self._names = tuple(names)
        self._info = dict(info)
        self._cache: dict = {}
        self._blocks: Optional[List[Any]] = None

    # -- description --------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._info.get("method", "kfac")

    @property
    def fisher_type(self) -> str:
        return self._info.get("fisher_type", "type-2")

    @property
    def kfac_approx(self) -> str:
        return self._info.get("kfac_approx", "expand")

    @property
    def damping(self) -> Optional[float]:
        return self._info.get("damping")

    @property
    def info(self) -> Dict[str, Any]:
        """How ``K`` was computed: method, fisher_type, kfac_approx, mc_samples, damping (a copy)."""
        return dict(self._info)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self._shapes)

    def __repr__(self) -> str:
        kinds: Dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.info.kind] = kinds.get(layer.info.kind, 0) + 1
        listing = ", ".join(f"{n} {k}" for k, n in kinds.items())
        n = len(self.layers)
        extra = f", damping={self.damping!r}" if self.damping is not None else ""
        return (f"KroneckerCurvature({self.method}, {n} layer{'s' if n != 1 else ''} ({listing}), "
                f"{self.num_parameters} parameters, fisher_type={self.fisher_type!r}, "
                f"kfac_approx={self.kfac_approx!r}{extra})")

    # -- blocks ---------------------------------------------------------------------------------

    def blocks(self) -> List[Any]:
        """One block per parameter leaf, in leaf order (:mod:`secorder.kronecker.blocks`).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(3, 2)
            >>> f = so.functional_loss(model, torch.nn.MSELoss())
            >>> K = so.kfac(f)(so.params_dict(model), torch.randn(4, 3), torch.randn(4, 2))
            >>> [type(b).__name__ + str(b.shape) for b in K.blocks()]     # leaves in ravel order: bias, weight
            ['KronBlock(2, 1)', 'KronBlock(2, 3)']
        """
        if self._blocks is None:
            found: Dict[int, Any] = {}
            for layer in self.layers:
                for leaf, block in layer.blocks(self._cache):
                    found[leaf] = block
            missing = [self._names[i] for i in range(len(self._shapes)) if i not in found]
            if missing:
                raise ValueError(f"internal: no Kronecker block for {missing}")
            self._blocks = [found[i] for i in range(len(self._shapes))]
        return self._blocks

    def _views(self) -> List[Tuple[int, int]]:
        return [block.shape for block in self.blocks()]

    def _leaves(self, v: Any, name: str) -> List[Tensor]:
        template = tree.unflatten(self._spec, [torch.empty(s, device="meta") for s in self._shapes])
        tree.check_like(v, template, name)
        return tree.leaves(v)

    def _map(self, v: Any, name: str, fn: Any) -> Any:
        leaves = self._leaves(v, name)
        out = []
        for leaf, block, view in zip(leaves, self.blocks(), self._views()):
            out.append(fn(block, leaf.reshape(view)).reshape(leaf.shape))
        return tree.unflatten(self._spec, out)

    def matvec_leaves(self, V: Sequence[Tensor]) -> List[Tensor]:
        """``K V`` for leaves with a leading probe dimension (the operator's batched product).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(3, 2)
            >>> f = so.functional_loss(model, torch.nn.MSELoss())
            >>> K = so.kfac(f)(so.params_dict(model), torch.randn(4, 3), torch.randn(4, 2))
            >>> [t.shape for t in K.matvec_leaves([torch.ones(5, 2), torch.ones(5, 2, 3)])]
            [torch.Size([5, 2]), torch.Size([5, 2, 3])]
        """
        out = []
        for leaf, block, view in zip(V, self.blocks(), self._views()):
            out.append(block.apply(leaf.reshape((leaf.shape[0],) + tuple(view))).reshape(leaf.shape))
        return out

    def block_matvec(self, index: int, V: Tensor) -> Tensor:
        """``K_ii V`` for leaf ``index``'s block, ``V`` with a leading probe dimension.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(3, 2)
            >>> f = so.functional_loss(model, torch.nn.MSELoss())
            >>> K = so.kfac(f)(so.params_dict(model), torch.randn(4, 3), torch.randn(4, 2))
            >>> torch.allclose(K.block_matvec(1, torch.ones(1, 2, 3))[0], K.mv({"weight": torch.ones(2, 3),
            ...                "bias": torch.zeros(2)})["weight"])
            True
        """
        view = self._views()[index]
        return self.blocks()[index].apply(V.reshape((V.shape[0],) + tuple(view))).reshape(V.shape)

    def _eigen_blocks(self) -> List[EigenBlock]:
        return [b.eigen() for b in self.blocks()]

    def _check_invertible(self, damping: float, what: str) -> None:
        if damping > 0:
            return
        values = [b.S.reshape(-1) for b in self._eigen_blocks()]
        S = torch.cat(values)
        if S.numel() == 0:
            return
        smin, smax = float(S.min()), float(S.abs().max())
        tol = smax * max(S.numel(), 1) * torch.finfo(S.dtype).eps
        if smin <= tol:
            raise ValueError(
                f"{what} with damping=0: K is singular (its smallest eigenvalue is {smin:.3g}, the largest "
                f"{smax:.3g}); pass damping > 0 for (K + damping I), as a prior precision or Tikhonov damping does")

    # -- the methods ----------------------------------------------------------------------------

    def mv(self, v: Any) -> Any:
        """``K v`` for ``v`` shaped like the parameters.

        Args:
            v: a pytree like the parameters.

        Returns:
            ``K v``, shaped like ``v``.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> K = so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 2.]]), torch.zeros(1, 1))
            >>> K.mv({"weight": torch.tensor([[1., 0.]])})     # 2 x x^T e_1 (exact for one sample)
            {'weight': tensor([[2., 4.]])}
        """
        return self._map(v, "v", lambda block, V: block.apply(V))

    def solve(self, v: Any, damping: float) -> Any:
        """``(K + damping I)^-1 v``, exactly damped, through the factors' eigendecompositions.

        Args:
            v: a pytree like the parameters.
            damping: a finite number >= 0. With ``damping=0`` a singular ``K`` (a
                cross-entropy model's ``G`` always is) raises a ``ValueError``.

        Returns:
            The solution, shaped like ``v``.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> K = so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 0.]]), torch.zeros(1, 1))
            >>> K.solve({"weight": torch.tensor([[2., 1.]])}, damping=1.0)   # diag(2, 0) + I
            {'weight': tensor([[0.6667, 1.0000]])}
        """
        damping = check_damping(damping)
        self._check_invertible(damping, "solve")
        return self._map(v, "v", lambda block, V: block.eigen().apply(V, 1.0 / (block.eigen().S + damping)))

    def inverse(self, damping: float) -> "KroneckerCurvature":
        """``(K + damping I)^-1`` as a :class:`KroneckerCurvature` (eigen form): for repeated solves.

        Its :meth:`mv` is :meth:`solve`; its diagonal, trace, log-determinant and
        eigenvalues are the inverse's.

        Args:
            damping: a finite number >= 0 (see :meth:`solve`).

        Returns:
            The inverse, ``method="inverse"``.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> K = so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 0.]]), torch.zeros(1, 1))
            >>> Kinv = K.inverse(damping=1.0)
            >>> Kinv.eigenvalues()
            tensor([1.0000, 0.3333])
        """
        damping = check_damping(damping)
        self._check_invertible(damping, "inverse")
        layers = []
        for layer in self.layers:
            blocks = dict(layer.blocks(self._cache))
            info = layer.info
            QA = QG = S_w = S_b = None
            if info.weight is not None:
                e = blocks[info.weight].eigen()
                QG, QA = (e.QL, e.QR) if info.out_first else (e.QR, e.QL)
                S_w = 1.0 / (e.S + damping)
            if info.bias is not None:
                e = blocks[info.bias].eigen()
                QG = e.QL
                S_b = 1.0 / (e.S.squeeze(-1) + damping)
            layers.append(Layer(info, QA=QA, QG=QG, S_weight=S_w, S_bias=S_b, eigen_form=True))
        info = dict(self._info, method="inverse", damping=damping, of=self.method)
        return KroneckerCurvature(layers, self._spec, self._shapes, self._names, info)

    def diagonal(self) -> Any:
        """The diagonal of ``K``, shaped like the parameters (from the factors, no products).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> K = so.kfac(f)(so.params_dict(model), torch.tensor([[1., 2.]]), torch.zeros(1, 1))
            >>> K.diagonal()
            {'weight': tensor([[2., 8.]]), 'bias': tensor([2.])}
        """
        out = [block.diagonal().reshape(shape) for block, shape in zip(self.blocks(), self._shapes)]
        return tree.unflatten(self._spec, out)

    def trace(self) -> Tensor:
        """The trace of ``K``, a 0-dim tensor (``tr(G) tr(A)`` per weight, ``tr(G)`` per bias).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> so.kfac(f)(so.params_dict(model), torch.tensor([[1., 2.]]), torch.zeros(1, 1)).trace()
            tensor(12.)
        """
        parts = [block.trace() for block in self.blocks()]
        return torch.stack(parts).sum() if parts else torch.zeros(())

    def trace_by_leaf(self) -> Tensor:
        """The trace of each leaf's block, a 1-dim tensor in leaf order.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> so.kfac(f)(so.params_dict(model), torch.tensor([[1., 2.]]), torch.zeros(1, 1)).trace_by_leaf()
            tensor([ 2., 10.])
        """
        return torch.stack([block.trace() for block in self.blocks()])

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + damping I)``, a 0-dim tensor, from the factors' eigenvalues.

        Args:
            damping: a finite number >= 0; ``0`` with a singular ``K`` raises a ``ValueError``.

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> K = so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 0.]]), torch.zeros(1, 1))
            >>> K.logdet(damping=1.0)          # log(3) + log(1)
            tensor(1.0986)
        """
        damping = check_damping(damping)
        self._check_invertible(damping, "logdet")
        parts = [torch.log(b.S + damping).sum() for b in self._eigen_blocks()]
        return torch.stack(parts).sum()

    def eigenvalues(self) -> Tensor:
        """All eigenvalues of ``K``, a 1-dim tensor in descending order (from the factors).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 0.]]), torch.zeros(1, 1)).eigenvalues()
            tensor([2., 0.])
        """
        values = torch.cat([b.S.reshape(-1) for b in self._eigen_blocks()])
        return values.sort(descending=True).values

    def to_dense(self) -> Tensor:
        """``K`` as a dense ``n x n`` matrix in :func:`secorder.tree.ravel` order (small models and tests).

        Example:
            >>> import torch, secorder as so
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
            >>> so.kfac(f)({"weight": torch.ones(1, 2)}, torch.tensor([[1., 2.]]), torch.zeros(1, 1)).to_dense()
            tensor([[2., 4.],
                    [4., 8.]])
        """
        return torch.block_diag(*[block.dense() for block in self.blocks()])


def _flatten(K: KroneckerCurvature) -> Tuple[List[Optional[Tensor]], Any]:
    children = [t for layer in K.layers for t in layer.tensors()]
    aux = (tuple((layer.info, layer.eigen_form) for layer in K.layers), K._spec, K._shapes, K._names,
           tuple(sorted(K._info.items())))
    return children, aux


def _unflatten(aux: Any, children: List[Optional[Tensor]]) -> KroneckerCurvature:
    infos, spec, shapes, names, info = aux
    n = len(Layer.FIELDS)
    layers = [Layer(i, *children[k * n:(k + 1) * n], eigen_form=e) for k, (i, e) in enumerate(infos)]
    return KroneckerCurvature(layers, spec, shapes, names, dict(info))


tree.register_node(KroneckerCurvature, _flatten, _unflatten, "secorder.KroneckerCurvature")
