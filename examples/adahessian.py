"""An AdaHessian-style optimiser: Adam's update with the Hutchinson Hessian diagonal in place of squared gradients.

AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, "ADAHESSIAN: An
Adaptive Second Order Optimizer for Machine Learning", AAAI 2021) keeps
Adam's first moment of the gradient ``m`` but replaces the second moment with
an exponential average of the *squared Hessian diagonal*, estimated at every
step from one Rademacher probe ``z`` as ``z * (H z)`` (Bekas et al. 2007):

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) D * D,      D = z * (H z)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

(the paper's spatial averaging of ``D`` over convolution kernels is left out:
this model has none). Here ``D`` is ``so.hessian_diag(f, method="hutchinson",
num_samples=1, generator=g)``: one Hessian-vector product per step.

The problem is a small MLP on inputs whose scales differ by a factor of 30,
which makes plain gradient descent slow along the small-curvature directions;
all three optimisers get the same number of steps from the same start.

Run: ``python examples/adahessian.py``
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value

import secorder as so


def make_problem():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, 1.5, 6)  # 1 .. ~32
    x = torch.randn(256, 6, generator=g) * scales
    w_true = torch.randn(6, 1, generator=g) / scales[:, None]
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, x, y


def adahessian(f, params: Dict[str, Tensor], data, steps: int, lr: float = 0.15,
               betas=(0.9, 0.999), eps: float = 1e-4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    diag = so.hessian_diag(f, method="hutchinson", num_samples=1, generator=gen)
    step = grad_and_value(f)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    b1, b2 = betas
    for t in range(1, steps + 1):
        g, _ = step(params, *data)
        d = diag(params, *data)
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * d[k] * d[k]
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            params[k] = params[k] - lr * m_hat / (v_hat.sqrt() + eps)
    return params


def adam(f, params, data, steps: int, lr: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
    step = grad_and_value(f)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    b1, b2 = betas
    for t in range(1, steps + 1):
        g, _ = step(params, *data)
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
            params[k] = params[k] - lr * (m[k] / (1 - b1 ** t)) / ((v[k] / (1 - b2 ** t)).sqrt() + eps)
    return params


def gd(f, params, data, steps: int, lr: float):
    step = grad_and_value(f)
    for _ in range(steps):
        g, _ = step(params, *data)
        params = {k: params[k] - lr * g[k] for k in params}
    return params


def main() -> None:
    model, x, y = make_problem()
    f = so.functional_loss(model, F.mse_loss)
    start = so.params_dict(model)
    fresh = lambda: {k: p.clone() for k, p in start.items()}
    steps = 40
    # the largest stable gradient-descent step is about 2 / (largest Hessian eigenvalue)
    lr_gd = 0.5 / float(so.trace(f)(start, x, y))
    results = {
        "gradient descent": gd(f, fresh(), (x, y), steps, lr=lr_gd),
        "Adam (lr 0.01)": adam(f, fresh(), (x, y), steps),
        "AdaHessian (lr 0.15)": adahessian(f, fresh(), (x, y), steps),
    }
    print(f"loss at the start: {float(f(start, x, y)):.4f}; after {steps} steps:")
    losses = {name: float(f(p, x, y)) for name, p in results.items()}
    for name, loss in losses.items():
        print(f"  {name:<22}{loss:.4f}")
    assert losses["AdaHessian (lr 0.15)"] < losses["gradient descent"]
    assert losses["AdaHessian (lr 0.15)"] < float(f(start, x, y)) / 2


if __name__ == "__main__":
    main()
