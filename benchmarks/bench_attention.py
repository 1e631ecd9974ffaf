"""What the math attention kernel costs: a Hugging Face GPT-2's gradient on the fused and the math kernel, and an HVP.

secorder evaluates ``f`` with ``F.scaled_dot_product_attention`` on PyTorch's math
kernel (:mod:`secorder.composites`), because the fused kernels have no double
backward. This benchmark measures the price on the issue's GPT-2 (2 layers, width
64, 4 heads, vocabulary 1,000, N=4) at growing sequence lengths:

* one gradient ``torch.func.grad(f)`` with PyTorch's default (fused) kernel, the
  baseline: what training pays;
* the same gradient inside ``so.differentiable_ops()`` (the math kernel): the
  attention weights ``N x heads x T x T`` are materialised and saved;
* one Hessian-vector product ``so.hvp(f)`` (math kernel, forward over reverse).

Memory is reported twice: what one evaluation of ``f`` saves for its backward
pass (:func:`saved_mib`, deterministic: the attention weights of the math kernel
live there), and the harness's resident-set peak over the warm calls (noisy for
calls that reuse memory the first call freed).

Run: ``python -m benchmarks.bench_attention`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows). Each (method, row)
measurement runs in its own process (:mod:`benchmarks.harness`); rounds interleave
the methods and each keeps its fastest round. float32, CPU, one thread.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from benchmarks import harness

ROWS = {f"GPT-2 2x64, N=4, T={t}": dict(tokens=t) for t in (32, 128, 512)}


def workload(row):
    import transformers

    import secorder as so

    t = ROWS[row]["tokens"]
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_positions=t, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, t), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    f = so.functional_loss(model, nn.CrossEntropyLoss(), output=lambda out: out.logits.transpose(1, 2))
    return f, so.params_dict(model), {"input_ids": ids}, targets


def _grad(row, math):
    import secorder as so

    f, params, x, y = workload(row)
    g = torch.func.grad(f)
    if not math:
        return lambda: g(params, x, y)

    def run():
        with so.differentiable_ops():
            return g(params, x, y)

    return run


def _hvp(row):
    import secorder as so

    f, params, x, y = workload(row)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hvp = so.hvp(f)
    return lambda: hvp(params, x, y, v)


def saved_mib(row, math):
    """MiB that one evaluation of ``f`` saves for its backward pass (every saved tensor's storage, counted once).

    Deterministic, unlike a resident-set peak: the memory the graph holds between forward and backward,
    which is where the math kernel's attention weights (``N x heads x T x T`` per layer) live.
    """
    import contextlib

    import secorder as so

    f, params, x, y = workload(row)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with so.differentiable_ops() if math else contextlib.nullcontext():
            f(leaves, x, y)
    return sum(storages.values()) / 2**20


CASES = {}
for _row in ROWS:
    CASES[f"grad-fused:{_row}"] = (lambda r: lambda: _grad(r, False))(_row)
    CASES[f"grad-math:{_row}"] = (lambda r: lambda: _grad(r, True))(_row)
    CASES[f"hvp:{_row}"] = (lambda r: lambda: _hvp(r))(_row)

LABELS = {
    "grad-fused": "gradient, fused attention (PyTorch's default)",
    "grad-math": "gradient, math attention (`so.differentiable_ops()`)",
    "hvp": "`so.hvp(f)` (math attention)",
}
METHODS = list(LABELS)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 3 if quick else 10
    repeat = harness.repeat_option(1 if quick else 3)
    rows = harness.selected_rows(ROWS)
    lines = [
        "| row | method | warm (ms) | time ratio | saved for backward (MiB) | peak extra RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        res = {}
        for _ in range(repeat):
            for m in METHODS:
                harness.keep_fastest(res, m, harness.run_case("bench_attention", f"{m}:{row}", warm=warm))
        base = res["grad-fused"]
        saved = {"grad-fused": saved_mib(row, False), "grad-math": saved_mib(row, True)}
        for m in METHODS:
            r = res[m]
            kept = f"{saved[m]:.1f}" if m in saved else "n/a"
            lines.append(
                f"| {row} | {LABELS[m]} | {1e3 * r['warm_s']:.1f} | "
                f"{harness.fmt_ratio(r['warm_s'], base['warm_s'])} | {kept} | {r['peak_mib']:.1f} |"
            )
        print("\n".join(lines[-len(METHODS):]), flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
