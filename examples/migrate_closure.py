"""Migrating a closure-based script to secorder's functional API.

The first half is what a script written for ``torch_secorder.core`` looks like:
the loss is a closure over the model and the data, and the parameters are a
list. It still runs unchanged (the ``torch_secorder`` package ships with
secorder). The second half computes the same quantities with transforms:
the loss becomes a pure function of a parameter dict, which is what lets it
compose with ``vmap``, ``grad`` and ``torch.compile``.

Run: ``python examples/migrate_closure.py``
"""

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    # --- before: the closure API --------------------------------------------
    from torch_secorder.core.hessian_diagonal import hessian_diagonal
    from torch_secorder.core.hessian_trace import hessian_trace
    from torch_secorder.core.hvp import exact_hvp

    params = list(model.parameters())

    def closure():
        return F.cross_entropy(model(x), y)

    old_trace = hessian_trace(closure, params)
    old_diag = hessian_diagonal(closure, params)          # a list, one tensor per parameter
    old_hv = exact_hvp(closure, params, [torch.ones_like(p) for p in params])

    # --- after: the functional API ------------------------------------------
    import secorder as so

    f = so.functional_loss(model, F.cross_entropy)        # f(params, inputs, targets)
    p = so.params_dict(model)                             # {name: tensor}, detached

    new_trace = so.trace(f)(p, x, y)
    new_diag = so.hessian_diag(f)(p, x, y)                # a dict shaped like p
    new_hv = so.hvp(f)(p, x, y, {k: torch.ones_like(v) for k, v in p.items()})

    # Same numbers (to float32 rounding): the dict follows named_parameters(),
    # the list follows parameters(), which is the same order.
    assert torch.allclose(old_trace, new_trace, rtol=1e-4, atol=1e-6)
    for old, new in zip(old_diag, new_diag.values()):
        assert torch.allclose(old, new, rtol=1e-4, atol=1e-6)
    for old, new in zip(old_hv, new_hv.values()):
        assert torch.allclose(old, new, rtol=1e-4, atol=1e-5)

    print(f"Hessian trace, closure API   : {float(old_trace):.6f}")
    print(f"Hessian trace, functional API: {float(new_trace):.6f}")

    # What the functional form adds: an estimate with its error bar, and
    # per-example traces with vmap (each example keeps a batch dimension of 1).
    est = so.trace_estimate(f, method="hutchinson", num_samples=200, seed=0)(p, x, y)
    lo, hi = est.interval(0.95)
    print(f"Hutchinson, 200 probes       : {float(est.value):.4f}  (95% interval {float(lo):.4f} .. {float(hi):.4f})")
    per_example = torch.func.vmap(so.trace(f), in_dims=(None, 0, 0))(p, x[:, None], y[:, None])
    print(f"per-example traces           : mean {float(per_example.mean()):.6f} over {per_example.numel()} examples")
    assert torch.allclose(per_example.mean(), new_trace, rtol=1e-4)  # the mean loss's trace is the mean
    print("the closure and functional APIs agree")


if __name__ == "__main__":
    main()
