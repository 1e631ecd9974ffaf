"""What the stateless machinery of issue 24 costs: a model's forward pass plain, under the random-op recorder
(``secorder.problem._RandomTape``: a Python call per ATen op, on the first evaluation of a model that may draw
random numbers) and under ``so.hvp``'s forward-mode guard (``secorder.transforms.products._ForwardModeFailures``:
a Python call per torch function while forward-over-reverse runs), side by side in one run, as ratios to plain.

Run: ``python -m benchmarks.bench_stateless_overhead`` (``--quick``: fewer repetitions). CPU time of this process
(``time.process_time``), one thread, minimum over the repetitions.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from torch import nn

from secorder.problem import _RandomTape
from secorder.transforms.products import _ForwardModeFailures


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    x = torch.randn(64, 32)
    yield "mlp 32-64-64-10, batch 64", lambda: mlp(x).sum()
    try:
        import transformers
    except ImportError:  # the zoo model needs transformers
        return
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (4, 16))
    yield "GPT-2 (2 layers, 64 wide), 4 x 16 tokens", lambda: gpt2(input_ids=ids, use_cache=False).logits.sum()


def _cpu_time(ctx, fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        with ctx():
            fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    reps = 10 if "--quick" in sys.argv else 40
    torch.set_num_threads(1)
    print("| model | plain forward (ms) | recorder / plain | forward-mode guard / plain |")
    print("|---|---|---|---|")
    for name, fn in _models():
        with torch.no_grad():
            fn()
        plain = _cpu_time(contextlib.nullcontext, fn, reps)
        tape = _cpu_time(_RandomTape, fn, reps)
        guard = _cpu_time(_ForwardModeFailures, fn, reps)
        print(f"| {name} | {plain * 1e3:.2f} | {tape / plain:.2f} | {guard / plain:.2f} |")


if __name__ == "__main__":
    main()
