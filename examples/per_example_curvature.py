"""Per-example curvature with ``vmap``: which training examples sit in the sharpest parts of the loss?

``so.trace(f)`` is a function of ``(params, inputs, targets)``; mapping it over
the examples with ``torch.func.vmap(..., in_dims=(None, 0, 0))`` gives the
Hessian trace of each example's own loss, in one batched computation, with the
parameters shared. Each example keeps a batch dimension of one (``x[:, None]``)
so that the model sees the input shape it expects. The result is checked
against a Python loop over the examples, and their mean against the trace of
the mean loss (the trace is linear).

It then lists the three sharpest examples (largest trace), the three flattest
among those with a non-negative trace, and those whose trace is negative: their
loss curves down along more directions than up, which is not flatness.

Run: ``python examples/per_example_curvature.py``
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import secorder as so


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)

    per_example = vmap(so.trace(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    per_example_diag = vmap(so.hessian_diag(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])

    loop = torch.stack([so.trace(f)(params, x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(per_example, loop, rtol=1e-4, atol=1e-6)
    assert torch.allclose(per_example.mean(), so.trace(f)(params, x, y), rtol=1e-4)
    assert per_example_diag["0.weight"].shape == (48, 16, 8)  # one diagonal per example, laid out like params

    print(f"per-example Hessian traces over {len(x)} examples: "
          f"mean {float(per_example.mean()):.4f}, min {float(per_example.min()):.4f}, max {float(per_example.max()):.4f}")
    with torch.no_grad():
        confidence = F.softmax(model(x), dim=1).max(dim=1).values
    shown = 3
    sharpest = torch.argsort(per_example, descending=True)[:shown]
    non_negative = (per_example >= 0).nonzero().flatten()
    flattest = non_negative[torch.argsort(per_example[non_negative])][:shown]
    for title, rows in [(f"sharpest {shown} (largest trace)", sharpest),
                        (f"flattest {shown} (smallest non-negative trace)", flattest)]:
        print(f"{title}: index, trace, model confidence")
        for i in rows.tolist():
            print(f"  {i:>3}  {float(per_example[i]):>8.4f}  {float(confidence[i]):.3f}")
    negative = (per_example < 0).nonzero().flatten().tolist()
    # A negative trace is not flatness: that example's loss curves down along more directions than up
    # (its Hessian is indefinite: the Gauss-Newton part is PSD, the tanh layer's second derivative is not).
    print(f"{len(negative)} example(s) with a negative trace (curving down more than up, not flat): {negative}")
    print("vmap matches the loop over examples")


if __name__ == "__main__":
    main()
