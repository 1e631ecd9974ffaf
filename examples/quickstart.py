"""Hessian trace and diagonal of a small MLP's loss, in a few lines of secorder.

Run: ``python examples/quickstart.py``
"""

import torch
import torch.nn.functional as F
from torch import nn

import secorder as so


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))

    f = so.functional_loss(model, F.cross_entropy)  # f(params, inputs, targets)
    params = so.params_dict(model)

    trace = so.trace(f)(params, x, y)
    diag = so.hessian_diag(f)(params, x, y)
    flat, _ = so.tree.ravel(diag)

    print(f"parameters        : {so.tree.size(params)}")
    print(f"loss              : {float(f(params, x, y)):.6f}")
    print(f"Hessian trace     : {float(trace):.6f}")
    print(f"diag min / median / max: {float(flat.min()):.3e} / {float(flat.median()):.3e} / {float(flat.max()):.3e}")
    print(f"negative diagonal entries: {100 * float((flat < 0).double().mean()):.1f}%")
    for name, d in diag.items():
        print(f"  trace of block {name:<9}: {float(d.sum()):.6f}")


if __name__ == "__main__":
    main()
