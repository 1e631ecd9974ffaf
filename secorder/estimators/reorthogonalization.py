"""How a Lanczos run keeps its basis orthogonal: ``reorthogonalize="full"`` or ``"partial"``.

A strategy is asked once per Lanczos step for the next basis vector: it gets the
recurrence vector ``u`` (already ``H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, or
a fresh direction after a Krylov breakdown) and returns it orthogonalised as much
as it decides to. :data:`STRATEGIES` is the registry the options are validated
against; a new strategy is one class with :meth:`Full.next_vector` and
:meth:`Full.restarted`, registered there.

* ``"full"``: one classical Gram-Schmidt pass of every new vector against the
  whole basis (two once the basis fills more than half the space). The basis is
  orthonormal to working precision (Parlett 1998, section 13.1); step ``j`` reads
  the basis twice, ``2 j n`` multiply-adds per run.
* ``"partial"`` (Simon 1984): the loss of orthogonality
  ``omega_{j+1,k} ~ q_{j+1}^T q_k`` is *estimated* by Simon's recurrence on the
  projected matrix alone,

  ``beta_{j+1} omega_{j+1,k} = (T omega_j)_k - alpha_j omega_{j,k} - beta_{j-1} omega_{j-1,k} + rounding``

  (``T`` the projected matrix, so the arrow of a thick restart is covered too), with
  a rounding term of ``eps ||H||`` of the sign that makes the estimate larger (as
  Larsen's PROPACK does). Only when ``max_k |omega_{j+1,k}| > sqrt(eps)`` is the
  new vector orthogonalised, against the interval of basis vectors whose estimate
  exceeds ``eps^(3/4)`` (Simon's modified rule; Larsen's intervals), and the next
  vector against the same interval (Simon's rule: both, or the lost components come
  back at the next step); those estimates are then reset to rounding level. A pass
  that cancels most of the vector is a near-breakdown (Daniel, Gragg, Kaufman and
  Stewart 1976), see below. After a Krylov breakdown or a near-breakdown (a recurrence vector shorter
  than ``sqrt(eps) ||H||``, or one that a pass mostly cancels: the three-term
  relation no longer holds to rounding, which Simon's analysis assumes), after a
  thick restart and once the basis fills half the space, the run continues with
  full reorthogonalisation; the breakdown test is then made after the pass against
  the whole basis. Local orthogonality against ``q_j`` and ``q_{j-1}``, which the
  recurrence assumes: the recurrence is one Gram-Schmidt pass against them, which leaves
  about ``eps ||H q_j|| / beta_j`` along them; that is where the estimate of those two
  entries starts, and a step whose recurrence vector is shorter than ``||H q_j|| / 8``
  takes a second pass against them instead. Simon's theorem: with every basis vector semi-orthogonal,
  ``|q_i^T q_k| <= sqrt(eps)``, the projected matrix equals ``Q^T H Q`` of an
  orthonormal basis of the same space up to ``O(eps ||H||)``, so the Ritz values
  and the Gauss quadrature nodes and weights are as accurate as with full
  reorthogonalisation, and no spurious copies ("ghosts") of converged Ritz values
  appear. The decision is taken on the host (one synchronisation per step); under
  ``torch.func.vmap``, where it cannot be, ``"partial"`` runs as ``"full"``.

Batched runs decide together: when any run of the batch needs a full pass, all
take it (the runs of an SLQ chunk lose orthogonality at about the same steps).

References:
    Simon, H. D. (1984). The Lanczos algorithm with partial reorthogonalization.
    Math. Comp. 42(165), 115-142.
    Parlett, B. N., Scott, D. S. (1979). The Lanczos algorithm with selective
    orthogonalization. Math. Comp. 33(145).
    Larsen, R. M. (1998). Lanczos bidiagonalization with partial
    reorthogonalization. DAIMI PB-537, Aarhus University.
    Parlett, B. N. (1998). The Symmetric Eigenvalue Problem. SIAM.
    Daniel, J. W., Gragg, W. B., Kaufman, L., Stewart, G. W. (1976).
    Reorthogonalization and stable algorithms for updating the Gram-Schmidt QR
    factorization. Math. Comp. 30(136).

Example:
    >>> STRATEGIES.names()
    ('full', 'partial')
    >>> check_reorthogonalize("some")
    Traceback (most recent call last):
    ...
    ValueError: unknown reorthogonalize='some'; valid values are 'full', 'partial'
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["STRATEGIES", "Full", "Partial", "check_reorthogonalize", "DEFAULT"]

#: The strategies by name (``reorthogonalize=`` values).
STRATEGIES: Registry = Registry("reorthogonalize")

# A Gram-Schmidt pass that leaves less than this fraction of the norm is repeated once.
_DGKS = 1 / math.sqrt(2)
# Partial reorthogonalisation: the recurrence leaves about eps ||H q_j|| along q_j and
# q_{j-1}; relative to a recurrence vector shorter than ||H q_j|| / _LOCAL_PASS a second
# local pass takes it out, else the estimate of the loss of orthogonality starts from it
# (eps ||H q_j|| / beta_j, at most _LOCAL_PASS eps). In Lanczos on curvature spectra
# beta_j / ||H q_j|| sits around 1/sqrt(2), so a DGKS-style threshold would take the
# second pass at every other step, for half a bit.
_LOCAL_PASS = 8.0

#: The default of the eigenvalue and density estimators.
DEFAULT = "partial"


def check_reorthogonalize(value: Any) -> str:
    """``value`` must name a registered strategy (see the module docstring for the example)."""
    if not isinstance(value, str):
        raise TypeError(f"reorthogonalize must be a str, got {type(value).__name__}")
    if STRATEGIES.lookup(value) is None:
        raise ValueError(f"unknown reorthogonalize={value!r}; valid values are "
                         f"{', '.join(map(repr, STRATEGIES.names()))}")
    return value


def under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` at some level (no host decisions then).

    Example:
        >>> import torch
        >>> under_vmap(torch.zeros(2)), bool(torch.func.vmap(lambda x: torch.tensor(under_vmap(x)))(torch.zeros(2)).all())
        (False, True)
    """
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


class Full:
    """Full reorthogonalisation: every new vector against the whole basis.

    ``next_vector(K, u, Q, broke, norm)`` returns ``u`` orthogonalised against ``Q``
    (``(p, j, n)``, the basis so far, ``j = K.j``) in ``K.space``, ``broke``
    (``(p,)``: which runs broke down, the given mask or more) and the norm of the
    returned vector (``None`` where it was not computed). ``u`` belongs to the step and
    is updated in place; ``norm`` is its norm as given (or ``None``).
    ``restarted(K)`` is told about a thick restart. ``K`` is the
    :class:`~secorder.estimators.lanczos.Krylov` object.
    """

    def __init__(self, K: Any):
        self.num_full_passes = 0  # passes against the whole basis
        self.num_vectors_read = 0  # basis vectors read by the passes (one per vector and pass)

    def next_vector(self, K: Any, u: Tensor, Q: Tensor, broke: Tensor,
                    norm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        u, norm = self._whole(K, u, Q, norm)
        return u, broke, norm

    def _whole(self, K: Any, u: Tensor, Q: Tensor, norm: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        from .lanczos import _orthogonalise

        # A second pass once the basis fills more than half the space, or where the first
        # cancelled most of the vector (a near-breakdown: Daniel, Gragg, Kaufman and
        # Stewart 1976, "twice is enough"; one pass leaves such a vector far from orthogonal).
        host = not under_vmap(u)
        for attempt in range(2):
            if host and norm is None:
                norm = K.space.norm(u)
            before = norm
            u = _orthogonalise(u, Q, space=K.space, inplace=True)
            self.num_vectors_read += Q.shape[1]
            norm = K.space.norm(u) if host else None
            again = 2 * K.j > K.n or (host and bool((norm < _DGKS * before).any()))
            if attempt == 1 or not again:
                break
        self.num_full_passes += 1
        return u, norm

    def restarted(self, K: Any) -> None:
        pass


class Partial(Full):
    """Partial reorthogonalisation (Simon 1984), see the module docstring.

    Simon's analysis assumes the three-term relation ``H Q = Q T + ...`` holds to
    rounding. A Krylov breakdown, or a near-breakdown (a recurrence vector shorter
    than ``sqrt(eps) ||H||``, or one that a Gram-Schmidt pass mostly cancels), drops a
    vector that is not rounding: from then on the run falls back to full
    reorthogonalisation (such runs have found an invariant subspace, as low-rank
    operators and matrices with few distinct eigenvalues do).
    """

    def __init__(self, K: Any):
        super().__init__(K)
        p, width = K.p, K.capacity + 1
        dtype, device = K.scale.dtype, K.scale.device
        self.eps = K.eps
        self.threshold = math.sqrt(K.eps)  # a pass is due above this
        self.band = K.eps ** 0.75  # ... against the vectors whose estimate is above this
        # omega[:, k] ~ q_j^T q_k for the newest vector q_j; prev: for q_{j-1}.
        self.omega = torch.zeros(p, width, dtype=dtype, device=device)
        self.omega[:, 0] = 1
        self.prev = torch.zeros(p, width, dtype=dtype, device=device)
        self.owed: Optional[Tuple[int, int]] = None  # the interval the next vector still owes a pass against
        self.full = False  # fell back to full reorthogonalisation

    def next_vector(self, K: Any, u: Tensor, Q: Tensor, broke: Tensor,
                    norm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        from .lanczos import _orthogonalise

        # Under vmap no host decision; after a breakdown, a restart, or once the basis fills
        # half the space (where the spare direction may lie mostly inside it): full passes.
        if under_vmap(u):
            self.full = True
            return super().next_vector(K, u, Q, broke, norm)
        if self.full or bool(broke.any()) or 2 * K.j > K.n:
            self.full = True
            return self._settle(K, u, Q, broke, norm)
        j = K.j  # the new vector is q_j; the basis holds q_0 .. q_{j-1}
        space = K.space
        # Local orthogonality against the last two vectors, which the recurrence assumes:
        # the recurrence is one Gram-Schmidt pass against them and leaves components of
        # about eps ||H q_{j-1}|| along them, eps relative to the recurrence vector unless
        # the pass cancelled most of it; then a second pass takes them out (Daniel, Gragg,
        # Kaufman and Stewart 1976: twice is enough).
        beta = space.norm(u) if norm is None else norm
        # local: what is left along q_{j-1} and q_{j-2}, relative to the new vector, in eps
        local = torch.clamp(K.product_norm / torch.clamp(beta, min=torch.finfo(beta.dtype).tiny), min=1.0)
        if bool((local > _LOCAL_PASS).any()):
            u = _orthogonalise(u, Q[:, max(0, j - 2) : j], space=space, inplace=True)
            beta = space.norm(u)
            local = torch.ones_like(local)
        if bool((beta <= self.threshold * K.scale).any()):  # a near-breakdown
            self.full = True
            return self._settle(K, u, Q, broke, beta)
        new = torch.zeros_like(self.omega)
        if j >= 2:
            i = j - 1  # u came from the product of q_i
            T = K.projected()  # (p, j, j): covers the arrow of a thick restart
            rec = torch.bmm(T, self.omega[:, :j, None]).squeeze(-1)[:, :i]
            rec = rec - K.diag[-1][:, None] * self.omega[:, :i] - K.off[-1][:, None] * self.prev[:, :i]
            # rounding of the product and of the recurrence, as large as it can make the estimate
            rec = rec + torch.sign(rec) * (self.eps * K.scale)[:, None]
            new[:, :i] = rec / beta[:, None]
        new[:, max(0, j - 2) : j] = (self.eps * local)[:, None]
        new[:, j] = 1
        span, self.owed = self.owed, None
        big = (new[:, : j - 2].abs() > self.threshold).any(dim=0) if j > 2 else None
        if big is not None and bool(big.any()):
            # Orthogonalise against the interval of every vector whose estimate is above
            # eps^(3/4), now and at the next step (Simon 1984; Larsen 1998).
            wide = (new[:, : j - 2].abs() > self.band).any(dim=0).nonzero().flatten()
            lo, hi = int(wide[0]), int(wide[-1])
            span = (min(lo, span[0]), max(hi, span[1])) if span is not None else (lo, hi)
            self.owed = (lo, min(hi + 1, j - 1))
        if span is not None:
            lo, hi = span
            u = _orthogonalise(u, Q[:, lo : hi + 1], space=space, inplace=True)
            self.num_vectors_read += hi + 1 - lo
            after = space.norm(u)
            # A pass that cancels most of the vector is a near-breakdown (Daniel, Gragg,
            # Kaufman and Stewart 1976): full reorthogonalisation from here on.
            if bool((after < _DGKS * beta).any()):
                self.full = True
                return self._settle(K, u, Q, broke, after)
            beta = after
            if span == (0, j - 1):
                self.num_full_passes += 1
            new[:, lo : hi + 1] = self.eps
        self.prev, self.omega = self.omega, new
        return u, broke, beta

    def _settle(self, K: Any, u: Tensor, Q: Tensor, broke: Tensor,
                norm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """A near-breakdown: a whole pass, then the breakdown test on what is left (the
        test :class:`~secorder.estimators.lanczos.Krylov` made before it saw the
        components along a semi-orthogonal basis); a breakdown takes the spare direction."""
        from .lanczos import BREAKDOWN_FACTOR

        u, norm = self._whole(K, u, Q, norm)
        newly = (norm <= BREAKDOWN_FACTOR * K.eps * K.scale) & ~broke
        if bool(newly.any()):
            u = torch.where(newly[:, None], K.space.shifted(K.spare, K._shift), u)
            u, norm = self._whole(K, u, Q)
            broke = broke | newly
        return u, broke, norm

    def restarted(self, K: Any) -> None:
        # The kept Ritz vectors are combinations of a basis that was only semi-orthogonal,
        # and the arrow of the restarted matrix assumes an orthonormal one: full
        # reorthogonalisation from here on.
        self.full = True


STRATEGIES.register("full", Full)
STRATEGIES.register("partial", Partial)
