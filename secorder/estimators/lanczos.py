"""The Lanczos recurrence with full reorthogonalisation, batched over independent runs.

One :class:`Krylov` object advances ``p`` independent Lanczos runs (one per row
of a ``(p, n)`` start matrix) together: every step is **one** batched matvec of
the operator over the leading probe dimension, followed by the three-term
recurrence and one classical Gram-Schmidt pass of each new vector against its
own run's whole basis (full reorthogonalisation), as batched matrix products. The
estimators on top of it are :mod:`secorder.estimators.eigen` (extreme
eigenpairs, with thick restarts) and :mod:`secorder.estimators.slq` (spectral
densities by stochastic Lanczos quadrature).

Full reorthogonalisation. Plain Lanczos loses orthogonality as soon as a Ritz
value converges and then returns spurious copies of it (torch-secorder 0.0.1 on
``diag(5, 3, 1, -2)`` returns ``[5, 5, 4.998, 3]``). Here every new vector is
orthogonalised against all previous ones after the three-term recurrence, which
keeps the basis orthonormal to working precision (Parlett 1998, section 13.1;
Golub and Van Loan 2013, section 10.3.1); a second pass is added once the basis
fills more than half the space, where a random replacement vector (below) may lie
mostly inside it. The cost is ``2 j n`` multiply-adds at step ``j``, small next
to a Hessian-vector product for the sizes of interest.

Krylov breakdown. When the recurrence vector vanishes (its norm is at most
``1000 eps`` times the largest ``||H q_j||`` seen), the basis spans an invariant
subspace: the Ritz values found so far are exact eigenvalues. This is not an
error. The coupling is set to exactly zero and the run continues with a fresh
direction orthogonal to its basis (a cyclic shift of a random vector drawn at the
start, so no host synchronisation is needed and a fixed number of steps still
composes with ``torch.func.vmap``), which finds further eigenvalues, including
further copies of repeated ones. :attr:`Krylov.num_steps` records, per run, the
dimension of the first invariant subspace found (``num_iterations`` when there
was none).

Memory: the basis, ``p x (num_iterations + 1) x n`` entries in the working dtype.

References:
    Lanczos, C. (1950). An iteration method for the solution of the eigenvalue
    problem of linear differential and integral operators. J. Res. Nat. Bur.
    Standards 45.
    Parlett, B. N. (1998). The Symmetric Eigenvalue Problem. SIAM (Classics).
    Golub, G. H., Van Loan, C. F. (2013). Matrix Computations, 4th ed. JHU Press.
    Wu, K., Simon, H. (2000). Thick-restart Lanczos method for large symmetric
    eigenvalue problems. SIAM J. Matrix Anal. Appl. 22(2).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..operators import LeafOperator
from .._huge_pages import advise_huge_pages
from .reorthogonalization import under_vmap

__all__ = ["Krylov", "Euclidean", "FlatOperator", "block_operator", "working_dtype", "ritz_pairs", "BREAKDOWN_FACTOR"]

# A recurrence vector shorter than BREAKDOWN_FACTOR * eps * max_j ||H q_j|| is a
# Krylov breakdown: rounding noise (of the matvec and the recurrence) sits around
# 10-100 eps in our tests. Treating a genuine coupling that small as zero moves the
# Ritz values by at most that much (about 1e-4 relative in float32, 2e-13 in
# float64); in network Hessians and GGNs the couplings stay above 1e-2 of the norm.
# A noise-level vector that escapes detection is harmless: after the Gram-Schmidt
# pass it is a fresh direction orthogonal to the basis, coupled by a negligible beta.
BREAKDOWN_FACTOR = 1000.0


def working_dtype(templates: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the Lanczos vectors: the leaves' promoted dtype, at least float32.

    Example:
        >>> import torch
        >>> working_dtype([torch.zeros(1, dtype=torch.float16)]), working_dtype([torch.zeros(1, dtype=torch.float64)])
        (torch.float32, torch.float64)
    """
    dtype = torch.float32
    for t in templates:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def ritz_pairs(T: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of the projected matrices ``(p, j, j)``, with non-finite entries propagated.

    A run whose matrix holds ``nan`` or ``inf`` (a loss that is not finite) gets
    ``nan`` Ritz values and vectors instead of an ``eigh`` failure; no host
    synchronisation, so it runs under ``vmap``.

    Example:
        >>> import torch
        >>> ritz_pairs(torch.tensor([[[2., 0.], [0., 1.]], [[float("nan"), 0.], [0., 1.]]]))[0]
        tensor([[1., 2.],
                [nan, nan]])
    """
    finite = torch.isfinite(T).flatten(-2).all(dim=-1)  # (p,)
    theta, Y = torch.linalg.eigh(torch.where(finite[:, None, None], T, torch.zeros_like(T)))
    nan = torch.full_like(theta, float("nan"))
    return (torch.where(finite[:, None], theta, nan),
            torch.where(finite[:, None, None], Y, torch.full_like(Y, float("nan"))))


class Euclidean:
    """The space of whole flat vectors of dimension ``dim``: plain sums, norms and shifts.

    An operator on this rank's pieces of sharded parameters brings its own space
    (:class:`secorder.shards.Space`, the same methods with sums over the ranks); the
    recurrence below only ever goes through these methods.

    Example:
        >>> import torch
        >>> Euclidean(3).norm(torch.tensor([[3., 4., 0.]]))
        tensor([5.])
    """

    def __init__(self, dim: int):
        self.dim = dim

    def sum(self, x: Tensor) -> Tensor:
        """Partial sums over this process's entries made whole (nothing to do here)."""
        return x

    def norm(self, x: Tensor) -> Tensor:
        """Per row of ``(p, n)``: the Euclidean norm."""
        return torch.linalg.vector_norm(x, dim=1)

    def local(self, X: Tensor) -> Tensor:
        """Rows drawn over the whole space, ``(p, dim)``, as held here (all of them)."""
        return X

    def shifted(self, X: Tensor, shift: int) -> Tensor:
        """A cyclic shift of rows over the whole space (``X`` as drawn, ``(p, dim)``), as held here."""
        return torch.roll(X, shift, dims=1)


class FlatOperator:
    """A :class:`LeafOperator` seen as a batched map on ``(p, n)`` matrices.

    Rows are probes; a row is the concatenation of the flattened leaves. Counts
    the matvecs it performs (one per row). :attr:`space` is the operator's space
    (:class:`Euclidean` unless the operator works on shards); :attr:`dim` its
    dimension, and :meth:`randn`/:meth:`draw` draw random rows over the whole space,
    as held here.

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(2), torch.zeros(1)],
        ...                   lambda V: [2 * V[0], 3 * V[1]], None)
        >>> flat = FlatOperator(op)
        >>> flat(torch.ones(1, 3)), flat.num_matvecs
        (tensor([[2., 2., 3.]]), 1)
    """

    def __init__(self, op: LeafOperator):
        self.op = op
        self.templates = list(op.templates)
        self.sizes = [t.numel() for t in self.templates]
        self.space = op.space if op.space is not None else Euclidean(sum(self.sizes))
        self.dim = self.space.dim
        self.dtype = working_dtype(self.templates)
        self.device = self.templates[0].device
        self.num_matvecs = 0

    def to_leaves(self, X: Tensor) -> List[Tensor]:
        """``(p, n)`` to a leaf list with leading dim ``p`` (each leaf in its own dtype)."""
        p = X.shape[0]
        parts = torch.split(X, self.sizes, dim=1)
        return [part.reshape((p,) + tuple(t.shape)).to(t.dtype) for part, t in zip(parts, self.templates)]

    def to_flat(self, V: Sequence[Tensor]) -> Tensor:
        """A leaf list with leading dim ``p`` to ``(p, n)`` in the working dtype."""
        p = V[0].shape[0]
        return torch.cat([v.reshape(p, -1).to(self.dtype) for v in V], dim=1)

    def randn(self, p: int, generator: Optional[torch.Generator]) -> Tensor:
        """``(p, dim)`` standard normal rows over the whole space (not yet cut to what is held here)."""
        return torch.randn(p, self.dim, generator=generator, dtype=self.dtype, device=self.device)

    def draw(self, p: int, distribution: str, generator: Optional[torch.Generator]) -> Tensor:
        """``p`` probes of ``distribution`` over the whole space, as held here, ``(p, n)``."""
        from .probes import draw_probes

        whole = getattr(self.space, "templates", None)
        if whole is None:
            return self.to_flat(draw_probes(self.templates, p, distribution, generator=generator))
        V = draw_probes(whole(), p, distribution, generator=generator)
        return self.space.local(torch.cat([v.reshape(p, -1).to(self.dtype) for v in V], dim=1))

    def __call__(self, X: Tensor) -> Tensor:
        self.num_matvecs += X.shape[0]
        return self.to_flat(self.op.matvec(self.to_leaves(X)))


def block_operator(op: LeafOperator, index: int) -> LeafOperator:
    """The diagonal block of leaf ``index`` as an operator of its own (through ``block_matvec``).

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(2), torch.zeros(3)], None, lambda i, V: (i + 1) * V)
        >>> block_operator(op, 1).matvec([torch.ones(1, 3)])
        [tensor([[2., 2., 2.]])]
    """
    template = op.templates[index]
    return LeafOperator(
        templates=[template],
        matvec=lambda V: [op.block_matvec(index, V[0])],
        block_matvec=lambda _, V: op.block_matvec(index, V),
    )


# Below this many multiply-adds a projection is done elementwise rather than with
# torch.bmm: tiny BLAS calls cost more in threading overhead than in arithmetic.
_SMALL_PRODUCT = 2**16


def _coefficients(Q: Tensor, x: Tensor) -> Tensor:
    """Per run ``Q_r x_r``: ``(p, j, n) x (p, n) -> (p, j)``."""
    if Q.numel() <= _SMALL_PRODUCT:
        return (Q * x[:, None, :]).sum(dim=2)
    # (p, 1, n) x (p, n, j): both operands contiguous along n, the fast layout for BLAS.
    return torch.bmm(x.unsqueeze(1), Q.transpose(1, 2)).squeeze(1)


def _tracked(*tensors: Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then nothing is updated in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _orthogonalise(u: Tensor, Q: Tensor, c: Optional[Tensor] = None, space: Optional[Euclidean] = None,
                   inplace: bool = False) -> Tensor:
    """``u - Q^T c`` per run; by default ``c = Q u`` (summed over ``space``): one classical Gram-Schmidt pass.

    ``inplace``: ``u`` belongs to the caller and is overwritten (unless autograd records
    it, which the overwrite would invalidate). A Lanczos step touches a few ``(p, n)``
    arrays; on the CPU both the passes over memory and the fresh allocations (page
    faults) of arrays that large cost more than the arithmetic, so the step updates
    one array in place.
    """
    if c is None:
        c = _coefficients(Q, u)
        if space is not None:
            c = space.sum(c)
    inplace = inplace and not _tracked(u, Q)
    if Q.numel() <= _SMALL_PRODUCT:
        correction = (c[..., None] * Q).sum(dim=1)
        return u.sub_(correction) if inplace else u - correction
    if inplace:
        u.unsqueeze(1).baddbmm_(c.unsqueeze(1), Q, alpha=-1)
        return u
    return torch.baddbmm(u.unsqueeze(1), c.unsqueeze(1), Q, alpha=-1).squeeze(1)


class Krylov:
    """``p`` Lanczos runs that advance together, one batched matvec per step.

    Args:
        matvec: the operator on ``(p, n)`` matrices (e.g. a :class:`FlatOperator`).
        start: ``(p, n)`` start vectors (normalised here).
        capacity: the largest basis to hold (``num_iterations``); at most ``n``.
        spare: ``(p, dim)`` random vectors over the whole space; their cyclic shifts
            replace the recurrence vector at a breakdown.
        host_checks: look at the breakdown test on the host and build a replacement
            only when one is needed (one synchronisation per step, not under ``vmap``);
            by default the replacement is selected with ``torch.where`` every step.
        buffer: memory for the basis, ``(>= p, capacity + 1, n)``, such as the
            :attr:`buffer` of a finished run (its contents are overwritten): on the CPU
            the first write of fresh memory costs a page fault per 4 KiB, as much as
            the arithmetic of a step; ignored when it does not fit or under ``vmap``.
        space: the space of the vectors (default :class:`Euclidean`): ``start`` and the
            basis hold what ``space.local`` keeps of vectors over the whole space, and
            every inner product and norm goes through ``space.sum``/``space.norm``.

    After ``extend(m)``, :meth:`projected` is the ``(p, j, j)`` matrix
    ``Q^T H Q`` (tridiagonal, or arrowhead plus tridiagonal after
    :meth:`restart`), :attr:`basis` holds the ``j`` orthonormal vectors of each
    run, :attr:`next_vector` the normalised residual direction and
    :attr:`next_beta` its coupling (``H Q = Q T + next_beta next_vector e_j^T``),
    :attr:`last_broke` whether the latest step broke down (``(p,)`` bool) and
    :meth:`steps_until_breakdown` the dimension of each run's first invariant
    subspace.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([5., 3., 1., -2.], dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> K = Krylov(lambda X: X @ A, torch.randn(1, 4, generator=g, dtype=torch.float64), 4,
        ...            torch.randn(1, 4, generator=g, dtype=torch.float64))
        >>> K.extend(4)
        >>> torch.linalg.eigvalsh(K.projected()).round(decimals=12)
        tensor([[-2.,  1.,  3.,  5.]], dtype=torch.float64)
    """

    def __init__(self, matvec: Callable[[Tensor], Tensor], start: Tensor, capacity: int, spare: Tensor,
                 *, host_checks: bool = False, space: Optional[Euclidean] = None,
                 reorthogonalize: str = "full", buffer: Optional[Tensor] = None):
        from .reorthogonalization import STRATEGIES, check_reorthogonalize

        self.matvec = matvec
        self.host_checks = host_checks
        self.space = space if space is not None else Euclidean(start.shape[1])
        self.n = self.space.dim
        self.width = start.shape[1]
        self.p = start.shape[0]
        self.capacity = min(capacity, self.n)
        self.eps = torch.finfo(start.dtype).eps
        self.spare = spare
        self._start = start / self.space.norm(start)[:, None]
        self._Q: Optional[Tensor] = None  # (p, capacity + 1, n), allocated at the first step
        self._buffer = buffer
        self.j = 0  # vectors in the basis
        self.diag: List[Tensor] = []  # alpha_i, (p,) each
        self.off: List[Tensor] = []  # beta_i couples vectors i and i + 1
        self.arrow: Optional[Tensor] = None  # (p, l) couplings of vector l to the kept Ritz vectors
        self.locked = 0  # l: number of kept Ritz vectors after a restart
        self.scale = torch.zeros(self.p, dtype=start.dtype, device=start.device)
        self.product_norm = self.scale  # ||H q_j|| of the latest step, (p,)
        self.num_steps = torch.full((self.p,), -1, dtype=torch.int64, device=start.device)
        self.next_beta = torch.zeros(self.p, dtype=start.dtype, device=start.device)
        self.last_broke = torch.zeros(self.p, dtype=torch.bool, device=start.device)
        self._shift = 0
        self.strategy = STRATEGIES.get(check_reorthogonalize(reorthogonalize))(self)

    @property
    def buffer(self) -> Optional[Tensor]:
        """The memory of the basis (``None`` before the first step), for the next run's ``buffer``."""
        return self._Q

    @property
    def basis(self) -> Tensor:
        """``(p, j, n)``: the orthonormal basis of each run."""
        return self._Q[:, : self.j]

    @property
    def next_vector(self) -> Tensor:
        """``(p, n)``: the next basis vector (zero once the whole space is spanned)."""
        return self._Q[:, self.j]

    def _alloc(self, like: Tensor) -> None:
        # Derived from the first matvec's output so that, under torch.func.vmap, the
        # buffer is batched like the vectors written into it. Every slot is written
        # before it is read, except the last one once the basis spans the whole space.
        shape = (self.p, self.capacity + 1, self.width)
        buffer = self._buffer
        if (buffer is not None and buffer.dim() == 3 and buffer.shape[0] >= self.p
                and tuple(buffer.shape[1:]) == shape[1:] and buffer.dtype == like.dtype
                and buffer.device == like.device and not under_vmap(like)):
            self._Q = buffer[: self.p]
        else:
            self._Q = like.new_empty(shape)
            advise_huge_pages(self._Q)
        self._Q[:, self.capacity] = 0

    def extend(self, steps: int) -> None:
        """Run ``steps`` more Lanczos steps (``steps`` batched matvecs)."""
        if self.j + steps > self.capacity:
            raise ValueError(f"the Krylov basis holds {self.capacity} vectors; cannot extend {self.j} by {steps}")
        for _ in range(steps):
            self._step()

    def _step(self) -> None:
        j = self.j
        q = self._start if self._Q is None else self._Q[:, j]
        w = self.matvec(q)
        if self._Q is None:
            self._alloc(w)
            self._Q[:, 0] = q
        space = self.space
        # The recurrence w - alpha q_j - beta q_{j-1} (or the arrow to the kept Ritz
        # vectors right after a thick restart), one product over adjacent basis slots.
        alpha = space.sum(_coefficients(q.unsqueeze(1), w).squeeze(1))
        if j == 0:
            local, c = self._Q[:, :1], alpha[:, None]
        elif j == self.locked and self.arrow is not None:
            local, c = self._Q[:, : j + 1], torch.cat([self.arrow, alpha[:, None]], dim=1)
        else:
            local, c = self._Q[:, j - 1 : j + 1], torch.stack([self.off[-1], alpha], dim=1)
        host = not under_vmap(w)
        # From here on the step updates one array in place (on the CPU, passes over
        # arrays this large and fresh allocations of them cost more than the arithmetic):
        # the product itself where it is an array of its own (a FlatOperator's output is
        # always a new one; another matvec's might alias its input).
        u = _orthogonalise(w, local, c, inplace=host and isinstance(self.matvec, FlatOperator))
        del w
        beta_rec = space.norm(u)
        # ||H q_j|| (the scale of the breakdown test) without another pass over H q_j: the
        # coefficients and the rest are orthogonal to rounding.
        self.product_norm = torch.sqrt(beta_rec**2 + (c * c).sum(dim=1))
        self.scale = torch.maximum(self.scale, self.product_norm)
        self.diag.append(alpha)
        self.j = j + 1
        if self.j == self.n:
            # The basis spans the whole space: there is no next vector.
            self.next_beta = torch.zeros_like(alpha)
            self._record_breakdown(torch.zeros_like(alpha, dtype=torch.bool))
            return
        # A breakdown (the recurrence vector is at rounding level) takes a cyclic shift
        # of the spare vector instead; one Gram-Schmidt pass against the whole basis
        # then orthogonalises whichever it is. Outside vmap the test is read on the host
        # and the replacement built only when needed.
        broke = beta_rec <= BREAKDOWN_FACTOR * self.eps * self.scale
        self._shift += 1
        if (self.host_checks or host) and not bool(broke.any()):
            norm: Optional[Tensor] = beta_rec
        else:
            u = torch.where(broke[:, None], space.shifted(self.spare, self._shift), u)
            norm = None
        # The strategy may find a breakdown the test above missed (partial
        # reorthogonalisation: the recurrence vector is short only once its components
        # along the basis are removed); it then returns the replacement too.
        u, broke, norm = self.strategy.next_vector(self, u, self._Q[:, : self.j], broke, norm)
        if norm is None:
            norm = space.norm(u)
        self._record_breakdown(broke)
        beta = torch.where(broke, torch.zeros_like(norm), norm)
        norm = torch.clamp(norm, min=torch.finfo(u.dtype).tiny)[:, None]
        if host and not _tracked(u, self._Q, norm):
            torch.div(u, norm, out=self._Q[:, self.j])  # one pass, straight into the basis
        else:
            self._Q[:, self.j] = u / norm
        self.next_beta = beta
        if self.j < self.capacity:
            self.off.append(beta)

    def _record_breakdown(self, broke: Tensor) -> None:
        self.last_broke = broke
        first = (self.num_steps < 0) & broke
        self.num_steps = torch.where(first, torch.full_like(self.num_steps, self.j), self.num_steps)

    def steps_until_breakdown(self) -> Tensor:
        """``(p,)`` int64: per run, the dimension of the first invariant subspace found, else ``j``."""
        return torch.where(self.num_steps < 0, torch.full_like(self.num_steps, self.j), self.num_steps)

    def projected(self) -> Tensor:
        """``(p, j, j)``: the projected matrix ``Q^T H Q`` of each run."""
        j = self.j
        T = torch.diag_embed(torch.stack(self.diag, dim=1))
        if j > 1:
            off = torch.stack(self.off[: j - 1], dim=1)
            T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
        if self.arrow is not None and self.locked < j:
            l = self.locked
            row = torch.zeros(self.p, j, dtype=T.dtype, device=T.device)
            row[:, :l] = self.arrow
            e = torch.zeros(j, dtype=T.dtype, device=T.device)
            e[l] = 1
            T = T + row[:, None, :] * e[None, :, None] + row[:, :, None] * e[None, None, :]
        return T

    def restart(self, Y: Tensor, theta: Tensor) -> None:
        """Thick restart (Wu and Simon 2000): keep the Ritz pairs given by ``Y`` (``(p, j, l)``)
        and ``theta`` (``(p, l)``), and continue from the current residual direction."""
        l = Y.shape[-1]
        if l >= self.j:
            raise ValueError(f"a thick restart keeps fewer vectors than the basis holds ({l} >= {self.j})")
        kept = torch.bmm(Y.transpose(1, 2), self._Q[:, : self.j])  # (p, l, n)
        residual = self._Q[:, self.j].clone()
        arrow = self.next_beta[:, None] * Y[:, -1, :]
        self._Q[:, :l] = kept
        self._Q[:, l] = residual
        self._Q[:, l + 1 :] = 0
        self.diag = list(theta.unbind(dim=1))
        self.off = [torch.zeros_like(theta[:, 0])] * l
        self.arrow = arrow
        self.locked = l
        self.j = l
        self.strategy.restarted(self)
