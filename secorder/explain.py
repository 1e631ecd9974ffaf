"""``so.explain(fn)(*args, **kwargs)``: the route a call of a transformed function would take, without taking it.

A transform such as ``so.diagonal(f)`` chooses per call between the structured
engine (one backward sweep through the model's layers) and the generic path (a
curvature operator and an estimator), and ``so.laplacian`` between the forward
Laplacian and Hessian-vector products. :func:`explain` runs only the checks that
make this choice (and, for the structured engine, its forward pass, where a layer
can still decline) and says what the call would cost. Nothing is stored anywhere:
unlike the per-thread ``fn.last_engine`` debug view, the answer is a value.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from .transformed import Transformed

__all__ = ["Explanation", "explain"]


class Explanation(NamedTuple):
    """The route of one call of a transformed function (see :func:`explain`).

    Fields:
        transform: the transformed function's name (``"diagonal(loss)"``).
        engine: ``"structured"`` or ``"generic"`` for the curvature transforms;
            ``"forward"`` or ``"exact"`` for ``so.laplacian``... the route taken.
        reason: why the faster route does not run (``None`` when it does, or when
            the transform has one route).
        products: curvature-vector products the call takes (``0`` for the
            structured engine; ``None`` where the count is decided while running:
            adaptive stopping, Lanczos to a tolerance, solvers).
        sweeps: passes of the structured engine or of the forward Laplacian (one
            per batch of a data-set loss; ``0`` on the generic path; ``None`` when
            the data set does not say its length).
    """

    transform: str
    engine: str
    reason: Optional[str]
    products: Optional[int]
    sweeps: Optional[int]


def explain(fn: Any) -> Callable[..., Explanation]:
    """The route and cost of a call of ``fn``, a function returned by a secorder transform.

    Args:
        fn: a transformed function (``so.diagonal(f)``, ``so.trace(f)``,
            ``so.laplacian(u)``, ``so.hvp(f)``, ...).

    Returns:
        ``explain_fn(*args, **kwargs)`` taking what ``fn`` takes and returning an
        :class:`Explanation`. It raises what the call would raise for bad arguments
        (and, with ``engine="structured"``, the engine's reason to decline).

    Raises:
        TypeError: ``fn`` is not a secorder transform's function.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> p, x, y = so.params_dict(model), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> so.explain(so.diagonal(f, curvature="ggn"))(p, x, y)
        Explanation(transform='diagonal(FunctionalLoss)', engine='structured', reason=None, products=0, sweeps=1)
        >>> e = so.explain(so.diagonal(f, engine="generic"))(p, x, y)   # the Hessian: a product per parameter
        >>> e.engine, e.products
        ('generic', 8)
        >>> so.explain(so.diagonal(f, curvature="ggn", engine="generic"))(p, x, y).products  # loss-factor VJPs
        0
        >>> so.explain(len)
        Traceback (most recent call last):
        ...
        TypeError: so.explain takes a function returned by a secorder transform (so.trace(f), so.diagonal(f), ...), got builtin_function_or_method
    """
    if not isinstance(fn, Transformed):
        raise TypeError(
            "so.explain takes a function returned by a secorder transform (so.trace(f), so.diagonal(f), ...), "
            f"got {type(fn).__name__}")

    def explain_fn(*args: Any, **kwargs: Any) -> Explanation:
        if fn._explain is None:
            return Explanation(fn.__name__, "generic", None, None, 0)
        return fn._explain(args, kwargs)

    explain_fn.__name__ = explain_fn.__qualname__ = f"explain({fn.__name__})"
    return explain_fn
