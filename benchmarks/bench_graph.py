"""The structured engine's graph walker on Hugging Face models the module walker declines.

Run: ``python -m benchmarks.bench_graph`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows). Each (method, row) runs
in its own process (:mod:`benchmarks.harness`), rounds interleave the methods
and each keeps its fastest round. Float32 on the CPU, one thread
(``OMP_NUM_THREADS=1`` unless set), cross-entropy with mean reduction. Times are
reported in units of one gradient (``torch.func.grad`` of the same loss) measured
in the same run. No peer runs these models structured (BackPACK refuses them;
curvlinops has no exact diagonal): the generic one-hot path would take one
product per parameter.

Rows:

* HF ``ResNetForImageClassification`` (hidden sizes 16/32/64/128, depths
  2/2/2/2, embedding 16, 10 classes), N=8, 32x32: exact Hessian diagonal and exact
  GGN diagonal (issue 21 asks for at most 2C = 20 and C = 10 gradients).
* HF ViT (2 layers, width 64, 4 heads, patch 4, 32x32, 10 classes), N=8: exact
  GGN diagonal (at most 4C = 40 gradients). Its exact Hessian declines at this
  size: attention's residual would take ``2 N (3 T d)^2`` = 2.5e9 entries of
  columns (T = 65 tokens), above ``MAX_RESIDUAL_ENTRIES``.
* Tracing cost: ``torch.export`` + ``run_decompositions`` + binding the rules,
  paid once per model and input shape (``trace`` rows: every call re-traces).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from benchmarks import harness

ROWS = {
    "HF ResNet 16/32/64/128 N=8 32x32": "resnet",
    "HF ViT 2x64 h=4 p=4 N=8 32x32": "vit",
}
METHODS = {"resnet": ("grad", "hessian", "ggn", "trace"), "vit": ("grad", "ggn", "trace")}


def workload(row):
    import transformers as t

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if ROWS[row] == "resnet":
        model = t.ResNetForImageClassification(t.ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
            layer_type="basic", num_labels=10))
    else:
        model = t.ViTForImageClassification(t.ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, num_labels=10))
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return model.eval(), {"pixel_values": x}, y


def _case(row, what):
    import secorder as so

    model, inputs, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    if what == "grad":
        g = torch.func.grad(f)
        return lambda: g(params, inputs, y)
    if what == "trace":
        from secorder.structured.graph import sweep
        from secorder.structured.graph.trace import _export

        def run():
            t = _export(model, (), dict(inputs))
            return sweep._plan(t, set(params), 0, False, {})

        return run
    fn = so.hessian_diag(f, engine="structured") if what == "hessian" else so.ggn_diag(f, engine="structured")
    return lambda: fn(params, inputs, y)


CASES = {f"{w}:{row}": (lambda r, w: lambda: _case(r, w))(row, w) for row in ROWS for w in METHODS[ROWS[row]]}

LABELS = {"grad": "one gradient (`torch.func.grad`)", "hessian": "secorder `hessian_diag` (structured, graph)",
          "ggn": "secorder `ggn_diag` (structured, graph)",
          "trace": "tracing for a new input shape (export + decompositions + rules)"}


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 2 if quick else 5
    repeat = harness.repeat_option(1 if quick else 2)
    lines = ["| row | method | warm (ms) | first call (ms) | peak extra mem (MiB) | time in gradients |",
             "|---|---|---|---|---|---|"]
    for row in harness.selected_rows(ROWS):
        methods = METHODS[ROWS[row]]
        res = {}
        for _ in range(repeat):
            for m in methods:
                r = harness.run_case("bench_graph", f"{m}:{row}", warm=1 if m == "trace" else warm)
                harness.keep_fastest(res, m, r)
        g = res["grad"]["warm_s"]
        for m in methods:
            r = res[m]
            lines.append(f"| {row} | {LABELS[m]} | {1e3 * r['warm_s']:.1f} | {1e3 * r['first_s']:.1f} | "
                         f"{r['peak_mib']:.1f} | {harness.fmt_ratio(r['warm_s'], g)} |")
        print("\n".join(lines[-len(methods):]), flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
