"""Curvature backends for laplace-torch 0.3: ``SecorderGGN``, ``SecorderEF``, ``SecorderHessian``.

laplace-torch picks the curvature of its Laplace approximations through a backend
class (``laplace.curvature.CurvatureInterface``); these compute it with secorder:

* ``diag(x, y)``: the exact diagonal (``so.diagonal``: the structured engine, or
  per-sample loss-factor products for the GGN and the Fishers);
* ``full(x, y)``: the dense matrix (``so.linear_operator(...).to_dense()``, columns
  through the batched products);
* ``kron(x, y, N)``: the Kronecker factors of ``so.kfac`` (type-2 for the GGN,
  Monte-Carlo with ``stochastic=True``, empirical for ``SecorderEF``), in
  laplace-torch's ``Kron`` layout (where the K-FAC transform is available);
* ``gradients`` and ``jacobians``: laplace-torch's own ``torch.func`` code.

Every method returns laplace-torch's conventions: the loss and the curvature of
``lossfunc`` (cross-entropy or MSE with ``reduction="sum"``) scaled by ``factor``
(1 for classification, 1/2 for regression), vectors and matrices in the order of
``parameters_to_vector(model.parameters())`` over the parameters that require
gradients, restricted to ``subnetwork_indices`` or to the last layer when asked.

Usage::

    from laplace import Laplace
    from secorder.integrations.laplace import SecorderGGN

    la = Laplace(model, "classification", hessian_structure="diag", backend=SecorderGGN)
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")

Installing laplace-torch next to a CPU PyTorch: its dependencies pull torchvision
and a CUDA build of PyTorch, none of which the backends need. Install it without
them, then its pure-Python dependencies::

    pip install --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 torchmetrics lightning-utilities

(``backpack-for-pytorch``, ``curvlinops-for-pytorch``, ``opt_einsum``, ``scipy``,
``tqdm`` as usual). laplace-torch is imported when a backend class is first
looked up here; without it that lookup raises an ``ImportError`` saying so.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["SecorderGGN", "SecorderEF", "SecorderHessian", "SecorderInterface"]

_INSTALL = ("pip install --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 torchmetrics lightning-utilities "
            "(its own dependencies would pull torchvision and a CUDA PyTorch, which the backends do not need)")

_CLASSES: Dict[str, type] = {}


def _laplace_curvature() -> Any:
    try:
        import laplace.curvature as curvature
    except ImportError as err:
        raise ImportError(f"secorder.integrations.laplace needs laplace-torch: {_INSTALL}; importing it failed with: "
                          f"{type(err).__name__}: {err}") from err
    return curvature


def _build() -> Dict[str, type]:
    curvature = _laplace_curvature()
    import secorder as so

    class SecorderInterface(curvature.CurvatureInterface):
        """laplace-torch's ``CurvatureInterface`` computed with secorder (see the module docstring).

        Args:
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y:
                as for every laplace-torch backend.
            chunk_size: columns per batched product for ``full`` (default: automatic).
        """

        #: the secorder curvature of this backend (subclasses set it).
        curvature_name = "ggn"
        #: the ``fisher_type`` of ``so.kfac`` for ``kron``.
        kfac_fisher_type = "type-2"

        def __init__(self, model: nn.Module, likelihood: Any, last_layer: bool = False,
                     subnetwork_indices: Optional[torch.LongTensor] = None, dict_key_x: str = "input_ids",
                     dict_key_y: str = "labels", chunk_size: Optional[int] = None, **kwargs: Any):
            super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **kwargs)
            self.chunk_size = chunk_size
            # The last layer carries laplace-torch's own forward hook (its FeatureExtractor saves the features):
            # a hook-free copy of it computes the same (the parameters are passed in every call).
            module = _without_hooks(self._model) if last_layer else self._model
            self._f = so.functional_loss(module, self.lossfunc)

        # -- the call in secorder's terms -----------------------------------------------------

        @property
        def _curvature(self) -> str:
            return self.curvature_name

        @property
        def _mc_samples(self) -> int:
            return 1

        def _params(self) -> Dict[str, Tensor]:
            return {k: v for k, v in self._model.named_parameters() if v.requires_grad}

        def _inputs(self, x: Any) -> Any:
            if self.last_layer:
                with torch.no_grad():
                    _, features = self.model.forward_with_features(x)
                return features.detach()
            # laplace-torch calls model(x) with a dict x as one argument (a Hugging Face-style wrapper)
            return (x,) if isinstance(x, MutableMapping) else x

        def _run(self, compute: Any) -> Any:
            try:
                return compute()
            except RuntimeError as err:
                if "setup_context" not in str(err):
                    raise
                hooked = [name or type(m).__name__ for name, m in self._model.named_modules()
                          if m._backward_hooks or m._backward_pre_hooks]
                raise RuntimeError(
                    f"the model has full backward hooks (on {', '.join(hooked) or 'its modules'}; BackPACK's extend(), "
                    "which laplace-torch's BackPACK backends call, adds them), and torch.func cannot differentiate "
                    "through them: give the secorder backend a model that no BackPACK backend has extended (a "
                    f"copy.deepcopy made before), or remove the hooks ({err})") from err

        def _loss(self, x: Any, y: Tensor) -> Tensor:
            with torch.no_grad():
                return self.factor * self.lossfunc(self.model(x), y)

        def _order(self, params: Dict[str, Tensor]) -> Tensor:
            """For each position of secorder's flat order (``so.tree.ravel``), its position in laplace-torch's."""
            counts = [p.numel() for p in params.values()]
            positions = torch.arange(sum(counts), device=next(iter(params.values())).device)
            index = {k: part.reshape(p.shape) for (k, p), part in zip(params.items(), torch.split(positions, counts))}
            return so.tree.ravel(index)[0]

        def _restrict_vector(self, h: Tensor) -> Tensor:
            return h if self.subnetwork_indices is None else h[self.subnetwork_indices]

        def _options(self) -> Dict[str, Any]:
            return {"mc_samples": self._mc_samples} if self._curvature == "fisher" else {}

        # -- laplace-torch's interface --------------------------------------------------------

        def diag(self, x: Any, y: Tensor, **kwargs: Any) -> Tuple[Tensor, Tensor]:
            """The loss and the diagonal of the curvature (``(P,)``), both scaled by ``factor``."""
            params = self._params()
            inputs = self._inputs(x)
            d = self._run(lambda: so.diagonal(self._f, curvature=self._curvature, **self._options())(params, inputs, y))
            h = torch.cat([d[k].detach().reshape(-1) for k in params])
            return self._loss(x, y), self.factor * self._restrict_vector(h)

        def full(self, x: Any, y: Tensor, **kwargs: Any) -> Tuple[Tensor, Tensor]:
            """The loss and the dense curvature (``(P, P)``), both scaled by ``factor``."""
            params = self._params()
            inputs = self._inputs(x)
            op = self._run(lambda: so.linear_operator(self._f, curvature=self._curvature, chunk_size=self.chunk_size,
                                                      **self._options())(params, inputs, y))
            dense = self._run(op.to_dense).detach().to(next(iter(params.values())).dtype)
            order = self._order(params)
            H = torch.empty_like(dense)
            H[order[:, None], order[None, :]] = dense
            if self.subnetwork_indices is not None:
                idx = self.subnetwork_indices
                H = H[idx][:, idx]
            return self._loss(x, y), self.factor * H

        def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> Tuple[Tensor, Any]:
            """The loss and the K-FAC factors in laplace-torch's ``Kron`` (rescaled to ``N`` data points)."""
            return _kron(self, so, x, y, N, **kwargs)

    class SecorderGGN(SecorderInterface, curvature.GGNInterface):
        """The generalised Gauss-Newton (``stochastic=True``: the Monte-Carlo Fisher with ``num_samples`` labels)."""

        def __init__(self, model: nn.Module, likelihood: Any, last_layer: bool = False,
                     subnetwork_indices: Optional[torch.LongTensor] = None, dict_key_x: str = "input_ids",
                     dict_key_y: str = "labels", stochastic: bool = False, num_samples: int = 1,
                     chunk_size: Optional[int] = None):
            super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                             chunk_size=chunk_size, stochastic=stochastic, num_samples=num_samples)

        @property
        def _curvature(self) -> str:
            return "fisher" if self.stochastic else "ggn"

        @property
        def _mc_samples(self) -> int:
            return self.num_samples

        @property
        def kfac_fisher_type(self) -> str:  # type: ignore[override]
            return "mc" if self.stochastic else "type-2"

        diag = SecorderInterface.diag
        full = SecorderInterface.full
        kron = SecorderInterface.kron

    class SecorderEF(SecorderInterface, curvature.EFInterface):
        """The empirical Fisher (per-sample gradient outer products)."""

        curvature_name = "empirical_fisher"
        kfac_fisher_type = "empirical"
        diag = SecorderInterface.diag
        full = SecorderInterface.full
        kron = SecorderInterface.kron

    class SecorderHessian(SecorderInterface):
        """The Hessian of the loss (``diag`` and ``full``; ``kron`` uses the GGN's K-FAC, as curvlinops' does)."""

        curvature_name = "hessian"

    for cls in (SecorderInterface, SecorderGGN, SecorderEF, SecorderHessian):
        cls.__module__ = __name__
    return {c.__name__: c for c in (SecorderInterface, SecorderGGN, SecorderEF, SecorderHessian)}


def _without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every hook removed from the copy (the original is left alone)."""
    import copy

    clone = copy.deepcopy(module)
    for m in clone.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(m, name, None)
            if hooks is not None:
                hooks.clear()
    return clone


#: ``kron`` keyword arguments passed on to ``so.kfac`` (laplace-torch forwards them from the Laplace object).
KFAC_OPTIONS = ("kfac_approx", "mc_samples")


def _kron(backend: Any, so: Any, x: Any, y: Tensor, N: int, **kwargs: Any) -> Tuple[Tensor, Any]:
    """laplace-torch's ``kron``: the loss and a ``Kron`` of the batch's K-FAC factors, rescaled to ``N`` points.

    The factors are ``so.kfac``'s (curvlinops' conventions, ``fisher_type`` of the
    backend), laid out as laplace-torch's curvlinops backend lays out curvlinops'
    (per parameter in ``model.parameters()`` order: ``[G, A]`` for a weight, ``[G]`` for a
    bias, ``[G A]`` for a 1 x 1 weight alone; the input factor of every two-factor block
    times ``M / N`` for a batch of ``M``; everything times ``factor``), so that laplace-torch's
    sum over batches is the K-FAC of the whole data set.
    """
    kfac = getattr(so, "kfac", None)
    if kfac is None:
        raise NotImplementedError("hessian_structure='kron' needs secorder's K-FAC transform (so.kfac), which this "
                                  "build of secorder does not have; use 'diag' or 'full'")
    from laplace.utils import Kron

    if backend.subnetwork_indices is not None:
        raise ValueError("hessian_structure='kron' does not apply to a subnetwork (laplace-torch has no "
                         "Kronecker-factored subnetwork Laplace)")
    options = {k: v for k, v in kwargs.items() if k in KFAC_OPTIONS}
    if backend.kfac_fisher_type != "mc":
        options.pop("mc_samples", None)
    elif "mc_samples" not in options:
        options["mc_samples"] = backend._mc_samples
    params = backend._params()
    inputs = backend._inputs(x)
    K = backend._run(lambda: kfac(backend._f, fisher_type=backend.kfac_fisher_type, **options)(params, inputs, y))
    leaf_names = so.tree.leaves({k: k for k in params})  # leaf i of K is params[leaf_names[i]]
    covering: Dict[str, Tuple[Any, str]] = {}
    for layer in K.layers:
        info = layer.info
        if info.weight is not None:
            covering[leaf_names[info.weight]] = (layer, "weight")
        if info.bias is not None:
            covering[leaf_names[info.bias]] = (layer, "bias")
    kfacs: List[List[Tensor]] = []
    for name in params:
        if name not in covering:
            raise ValueError(f"hessian_structure='kron': parameter {name!r} is not in a layer K-FAC supports")
        layer, role = covering[name]
        G = layer.G.detach()
        A = layer.A.detach()
        A = torch.diag(A) if A.dim() == 1 else A
        if role == "bias":
            kfacs.append([G])
        elif not layer.info.out_first:  # an Embedding's [V, D] weight: A (x) G
            kfacs.append([A, G])
        elif layer.info.bias is None and G.numel() == A.numel() == 1:
            kfacs.append([G * A])
        else:
            kfacs.append([G, A])
    M = len(y)
    for F in kfacs:
        if len(F) == 2:
            F[1] = F[1] * (M / N)
    kron = Kron(kfacs) * backend.factor
    return backend._loss(x, y), kron


def __getattr__(name: str) -> Any:
    if name in __all__:
        if not _CLASSES:
            _CLASSES.update(_build())
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
