"""float64 references and helpers shared by the legacy tests (no tests here): dense Hessians over lists of leaves."""

import torch
from torch import nn
from torch.func import functional_call


class CountingClosure:
    """A closure that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self):
        self.calls += 1
        return self.fn()


def flat_fn_of_params(fn_of_values, params):
    """``g(flat)`` evaluating ``fn_of_values(list of tensors)`` at the unflattened ``flat``."""
    shapes = [p.shape for p in params]
    counts = [p.numel() for p in params]

    def g(flat):
        parts = torch.split(flat, counts)
        return fn_of_values([x.reshape(s) for x, s in zip(parts, shapes)])

    return g


def split_like(flat, params):
    parts = torch.split(flat, [p.numel() for p in params])
    return [x.reshape(p.shape) for x, p in zip(parts, params)]


def dense_hessian(fn_of_values, params):
    """The (n, n) Hessian of ``fn_of_values`` at ``params`` by ``torch.autograd.functional.hessian``."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(flat_fn_of_params(fn_of_values, params), flat)


def model_loss_of_values(model: nn.Module, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]

    def fn(values):
        return loss_fn(functional_call(model, dict(zip(names, values)), (x,)), y)

    return fn


def model_hessian(model, loss_fn, x, y):
    params = list(model.parameters())
    return dense_hessian(model_loss_of_values(model, loss_fn, x, y), params), params


def tanh_mlp(sizes=(4, 6, 3), dtype=torch.float64):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)
