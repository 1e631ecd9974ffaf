"""Structured exact Hessian/GGN diagonal vs BackPACK, one gradient, and the generic path.

Run: ``python -m benchmarks.bench_structured`` (``--quick`` for fewer warm calls,
``--repeat=R`` rounds, ``--row=NAME`` to select rows). Each (method, row)
measurement runs in its own process (see :mod:`benchmarks.harness`); the rounds
interleave the methods and each method keeps its fastest round (on a shared
machine, other load only ever slows a measurement down);
the table reports each method's warm time and peak extra memory, and ratios to
BackPACK's ``DiagHessian`` (``DiagGGNExact`` for the GGN rows) measured in the
same run. All in float32 on the CPU (one thread, ``OMP_NUM_THREADS=1`` unless set),
cross-entropy loss with mean reduction.
The generic one-hot path runs on the small row only (one HVP per parameter:
269,322 HVPs on the 784-wide rows would take hours).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from benchmarks import harness

ROWS = {
    "tanh 20-64-5 N=64": dict(kind="mlp", sizes=(20, 64, 5), act=nn.Tanh, n=64),
    "relu 784-256-256-10 N=256": dict(kind="mlp", sizes=(784, 256, 256, 10), act=nn.ReLU, n=256),
    "tanh 784-256-256-10 N=256": dict(kind="mlp", sizes=(784, 256, 256, 10), act=nn.Tanh, n=256),
    "cnn N=64": dict(kind="cnn", n=64),
    "convtranspose2d cnn N=64": dict(kind="convt", n=64),
    "conv3d cnn N=32": dict(kind="cnn3d", n=32),
}


def workload(row):
    spec = ROWS[row]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if spec["kind"] == "mlp":
        layers = []
        sizes = spec["sizes"]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(spec["act"]())
        model = nn.Sequential(*layers)
        x = torch.randn(spec["n"], sizes[0], generator=g)
        C = sizes[-1]
    elif spec["kind"] in ("convt", "cnn3d"):
        model, x = conv_workload(spec["kind"], spec["n"], g)
        C = 10
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
        )
        x = torch.randn(spec["n"], 1, 28, 28, generator=g)
        C = 10
    y = torch.randint(0, C, (spec["n"],), generator=g)
    return model.eval(), x, y


def _ours(row, what):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    fn = {
        "diag": so.hessian_diag(f, engine="structured"),
        "trace": so.trace(f, engine="structured"),
        "ggn": so.ggn_diag(f, engine="structured"),
        "generic": so.hessian_diag(f, engine="generic"),
    }[what]
    return lambda: fn(params, x, y)


def _grad(row):
    import secorder as so

    model, x, y = workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    g = torch.func.grad(f)
    return lambda: g(params, x, y)


def _backpack(row, what):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    model, x, y = workload(row)
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    ext = DiagHessian() if what in ("diag", "trace") else DiagGGNExact()
    attr = "diag_h" if what in ("diag", "trace") else "diag_ggn_exact"

    def run():
        model.zero_grad()
        loss = lossfunc(model(x), y)
        with backpack(ext):
            loss.backward()
        out = [getattr(p, attr) for p in model.parameters()]
        return sum(d.sum() for d in out) if what == "trace" else out

    return run


CASES = {}
for _row in ROWS:
    for _what in ("diag", "trace", "ggn", "generic"):
        CASES[f"ours-{_what}:{_row}"] = (lambda r, w: lambda: _ours(r, w))(_row, _what)
    for _what in ("diag", "trace", "ggn"):
        CASES[f"backpack-{_what}:{_row}"] = (lambda r, w: lambda: _backpack(r, w))(_row, _what)
    CASES[f"grad:{_row}"] = (lambda r: lambda: _grad(r))(_row)

# ---- a transformer language model (no BackPACK: it has no LayerNorm/attention rules) -------------
# Exact GGN diagonal against one gradient and the generic one-hot path. The generic path takes one
# GGN-vector product per parameter (110,400 here, more than an hour): it is timed on the 640
# LayerNorm parameters, which sit at every depth of the model (a product costs more the deeper its
# parameter), and scaled to all parameters (chunk_size=8: 32 columns at a time take 13 GB).

TRANSFORMER_ROWS = {
    "transformer 2 blocks d=64 h=4 T=32 V=64 N=16": dict(d=64, heads=4, tokens=32, vocab=64, n=16, blocks=2),
}
GENERIC_SUBSET = tuple(f"{b}.{i}.body.0.{p}" for b in (2, 3) for i in (0, 1) for p in ("weight", "bias")) + (
    "4.weight", "4.bias")


def transformer_workload(row):
    import secorder as so

    spec = TRANSFORMER_ROWS[row]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d, V, T = spec["d"], spec["vocab"], spec["tokens"]

    def block():
        return nn.Sequential(
            so.Residual(nn.Sequential(nn.LayerNorm(d), so.SelfAttention(d, spec["heads"], causal=True))),
            so.Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))))

    model = nn.Sequential(nn.Embedding(V, d), so.PositionalEmbedding(T, d), *[block() for _ in range(spec["blocks"])],
                          nn.LayerNorm(d), nn.Linear(d, V), nn.Flatten(0, 1))
    x = torch.randint(0, V, (spec["n"], T), generator=g)
    y = torch.randint(0, V, (spec["n"] * T,), generator=g)
    return model.eval(), x, y


def _transformer(row, what):
    import secorder as so

    model, x, y = transformer_workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    if what == "grad":
        g = torch.func.grad(f)
        return lambda: g(params, x, y)
    if what == "generic":
        sub = {k: params[k] for k in GENERIC_SUBSET}
        fn = so.ggn_diag(f, engine="generic", chunk_size=8)
        return lambda: fn(sub, x, y)
    if what == "fisher":  # the Monte-Carlo Fisher diagonal, one label per token
        fn = so.diagonal(f, curvature="fisher", mc_samples=1, seed=0, engine="structured")
        return lambda: fn(params, x, y)
    fn = so.ggn_diag(f, engine="structured")
    return lambda: fn(params, x, y)


for _row in TRANSFORMER_ROWS:
    for _what in ("ggn", "fisher", "grad", "generic"):
        CASES[f"tf-{_what}:{_row}"] = (lambda r, w: lambda: _transformer(r, w))(_row, _what)


def transformer_table(quick: bool, repeat: int) -> None:
    """Exact GGN diagonal of the transformer rows vs one gradient and vs the generic path (scaled)."""
    import secorder as so

    lines = ["| row | method | warm (ms) | peak extra mem (MiB) | time vs one gradient | time vs structured |",
             "|---|---|---|---|---|---|"]
    rows = harness.selected_rows(TRANSFORMER_ROWS)
    for row in rows:
        res = {}
        for _ in range(repeat):
            for m, warm in (("grad", 3 if quick else 10), ("ggn", 1 if quick else 3), ("fisher", 3 if quick else 10),
                            ("generic", 1)):
                r = harness.run_case("bench_structured", f"tf-{m}:{row}", warm=warm)
                harness.keep_fastest(res, m, r)
        model, _, _ = transformer_workload(row)
        params = so.params_dict(model)
        total, sub = sum(p.numel() for p in params.values()), sum(params[k].numel() for k in GENERIC_SUBSET)
        scaled = res["generic"]["warm_s"] * total / sub
        g, s = res["grad"]["warm_s"], res["ggn"]["warm_s"]
        for label, t, mem in (("one gradient (`torch.func.grad`)", g, res["grad"]["peak_mib"]),
                              ("secorder `ggn_diag` (structured)", s, res["ggn"]["peak_mib"]),
                              ("secorder `diagonal(curvature=\"fisher\")` (structured; one label per token, "
                               "summed per sequence)", res["fisher"]["warm_s"], res["fisher"]["peak_mib"]),
                              (f"secorder `ggn_diag` (generic one-hot; {sub:,} of {total:,} parameters timed, "
                               f"scaled)", scaled, res["generic"]["peak_mib"])):
            lines.append(f"| {row} | {label} | {1e3 * t:.1f} | {mem:.1f} | {harness.fmt_ratio(t, g)} | "
                         f"{harness.fmt_ratio(t, s)} |")
        print("\n".join(lines[-4:]), flush=True)
    print("\n" + "\n".join(lines))


# ---- CNNs with a transposed or a 3-D convolution (BackPACK runs them) --------------------------------


def conv_workload(kind, n, g):
    """``(model, x)`` of the ``convt`` and ``cnn3d`` rows."""
    if kind == "convt":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(16, 8, 3, stride=2), nn.ReLU(),
            nn.MaxPool2d(3), nn.Flatten(), nn.Linear(8 * 9 * 9, 10),
        )
        return model, torch.randn(n, 1, 28, 28, generator=g)
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(8, 16, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 1 * 5 * 5, 10),
    )
    return model, torch.randn(n, 1, 8, 16, 16, generator=g)


# ---- a ResNet of two basic blocks (BackPACK refuses it) -------------------------------------------
# Exact Hessian / GGN diagonals against one gradient, the generic one-hot path (one HVP per
# parameter, all of them) and curvlinops' Hutchinson diagonal estimate at 100 probes.

RESNET_ROWS = {"resnet 2 basic blocks c=8 16x16 N=32": dict(c=8, side=16, n=32, classes=10)}


def resnet_workload(row):
    import secorder as so

    spec = RESNET_ROWS[row]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    c = spec["c"]

    def basic_block():
        body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        return nn.Sequential(so.Residual(body), nn.ReLU())

    model = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                          basic_block(), basic_block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(c, spec["classes"]))
    x = torch.randn(spec["n"], 1, spec["side"], spec["side"], generator=g)
    y = torch.randint(0, spec["classes"], (spec["n"],), generator=g)
    return model.eval(), x, y


def _resnet(row, what):
    import secorder as so

    model, x, y = resnet_workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    if what == "grad":
        g = torch.func.grad(f)
        return lambda: g(params, x, y)
    if what == "hutchinson":
        from curvlinops import HessianLinearOperator, hutchinson_diag

        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                  check_deterministic=False)
        return lambda: hutchinson_diag(H, 100)
    fn = {"diag": so.hessian_diag(f, engine="structured"), "ggn": so.ggn_diag(f, engine="structured"),
          "generic": so.hessian_diag(f, engine="generic")}[what]
    return lambda: fn(params, x, y)


for _row in RESNET_ROWS:
    for _what in ("diag", "ggn", "grad", "generic", "hutchinson"):
        CASES[f"resnet-{_what}:{_row}"] = (lambda r, w: lambda: _resnet(r, w))(_row, _what)


def resnet_table(quick: bool, repeat: int) -> None:
    """The ResNet rows: structured diagonals vs one gradient, the generic path and curvlinops' Hutchinson."""
    lines = ["| row | method | warm (ms) | peak extra mem (MiB) | time vs one gradient | time vs structured |",
             "|---|---|---|---|---|---|"]
    labels = {"grad": "one gradient (`torch.func.grad`)", "diag": "secorder `hessian_diag` (structured)",
              "ggn": "secorder `ggn_diag` (structured)", "generic": "secorder `hessian_diag` (generic one-hot)",
              "hutchinson": "curvlinops `hutchinson_diag` (Hessian, 100 probes)"}
    rows = harness.selected_rows(RESNET_ROWS)
    for row in rows:
        res = {}
        for i in range(repeat):
            for m, warm in (("grad", 3 if quick else 10), ("diag", 3 if quick else 10), ("ggn", 3 if quick else 10),
                            ("hutchinson", 1 if quick else 3), ("generic", 1)):
                if m == "generic" and i:  # a minute or more per call: one round
                    continue
                r = harness.run_case("bench_structured", f"resnet-{m}:{row}", warm=warm)
                harness.keep_fastest(res, m, r)
        g, s = res["grad"]["warm_s"], res["diag"]["warm_s"]
        for m in ("grad", "diag", "ggn", "hutchinson", "generic"):
            t = res[m]["warm_s"]
            lines.append(f"| {row} | {labels[m]} | {1e3 * t:.1f} | {res[m]['peak_mib']:.1f} | "
                         f"{harness.fmt_ratio(t, g)} | {harness.fmt_ratio(t, s)} |")
        print("\n".join(lines[-5:]), flush=True)
    print("\n" + "\n".join(lines))


LABELS = {
    "ours-diag": "secorder `hessian_diag` (structured)",
    "backpack-diag": "BackPACK `DiagHessian`",
    "ours-trace": "secorder `trace` (structured)",
    "backpack-trace": "BackPACK `DiagHessian` + sum",
    "ours-ggn": "secorder `ggn_diag` (structured)",
    "backpack-ggn": "BackPACK `DiagGGNExact`",
    "grad": "one gradient (`torch.func.grad`)",
    "ours-generic": "secorder `hessian_diag` (generic one-hot)",
}
BASELINE = {"ours-diag": "backpack-diag", "ours-trace": "backpack-trace", "ours-ggn": "backpack-ggn",
            "backpack-diag": "backpack-diag", "backpack-trace": "backpack-trace", "backpack-ggn": "backpack-ggn",
            "grad": "backpack-diag", "ours-generic": "backpack-diag"}


# ---- wide outputs: the loss factor's memory bound (issue 9 item 15) ------------------------------
# An MLP 32-64-C with C classes: the cross-entropy factor has C columns per sample. BackPACK forms
# them at the logits ([C, N, C]: 512 MB at C = 1000, 51 GB at C = 10000, so not run there); here the
# factor stays implicit at the logits and its columns go back in chunks (factor_chunk_size, default
# bounded by 2**24 entries at the widest layer they are formed at).

WIDE_ROWS = {"relu 32-64-1000 N=128": 1000, "relu 32-64-10000 N=128": 10000}


def wide_workload(row):
    C = WIDE_ROWS[row]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, C))
    x, y = torch.randn(128, 32, generator=g), torch.randint(0, C, (128,), generator=g)
    return model.eval(), x, y


def _wide(row, what):
    import secorder as so
    from secorder.structured import functional_call_diag

    model, x, y = wide_workload(row)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    if what == "grad":
        g = torch.func.grad(f)
        return lambda: g(params, x, y)
    if what == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        m, lossfunc = extend(model), extend(nn.CrossEntropyLoss())

        def run():
            m.zero_grad()
            loss = lossfunc(m(x), y)
            with backpack(DiagGGNExact()):
                loss.backward()
            return [p.diag_ggn_exact for p in m.parameters()]

        return run
    chunk = WIDE_ROWS[row] if what == "ggn-whole" else None
    kind = "hessian" if what == "diag" else "ggn"
    return lambda: functional_call_diag(f, (params, x, y), kind, False, factor_chunk_size=chunk)


for _row in WIDE_ROWS:
    for _what in ("grad", "backpack", "ggn", "ggn-whole", "diag"):
        CASES[f"wide-{_what}:{_row}"] = (lambda r, w: lambda: _wide(r, w))(_row, _what)


def wide_table(quick: bool, repeat: int) -> None:
    """Exact GGN/Hessian diagonals with C = 1000 and 10000 classes: time and peak memory."""
    labels = {"grad": "one gradient (`torch.func.grad`)", "backpack": "BackPACK `DiagGGNExact`",
              "ggn": "secorder GGN diagonal (default factor chunks)",
              "ggn-whole": "secorder GGN diagonal (`factor_chunk_size=C`: all columns at once)",
              "diag": "secorder Hessian diagonal (default factor chunks)"}
    lines = ["| row | method | warm (ms) | peak extra mem (MiB) | time vs one gradient |", "|---|---|---|---|---|"]
    rows = harness.selected_rows(WIDE_ROWS)
    for row in rows:
        methods = ["grad", "ggn", "ggn-whole", "diag"] + (["backpack"] if WIDE_ROWS[row] <= 1000 else [])
        res = {}
        for _ in range(repeat):
            for m in methods:
                warm = 1 if m == "backpack" or quick else 3
                r = harness.run_case("bench_structured", f"wide-{m}:{row}", warm=warm)
                harness.keep_fastest(res, m, r)
        for m in methods:
            r = res[m]
            lines.append(f"| {row} | {labels[m]} | {1e3 * r['warm_s']:.1f} | {r['peak_mib']:.1f} | "
                         f"{harness.fmt_ratio(r['warm_s'], res['grad']['warm_s'])} |")
        print("\n".join(lines[-len(methods):]), flush=True)
    print("\n" + "\n".join(lines))


def main() -> None:
    # One thread per measurement (inherited by every subprocess): on a shared machine,
    # multi-threaded kernels spin against other processes and the timings become noise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 3 if quick else 10
    repeat = harness.repeat_option(1 if quick else 3)
    rows = harness.selected_rows(ROWS)
    lines = [
        "| row | method | warm (ms) | peak extra mem (MiB) | time vs BackPACK | mem vs BackPACK |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        methods = ["backpack-diag", "ours-diag", "backpack-trace", "ours-trace", "backpack-ggn", "ours-ggn", "grad"]
        if row.startswith("tanh 20-64-5"):
            methods.append("ours-generic")
        res = {}
        for _ in range(repeat):  # rounds interleave the methods; keep each method's fastest run
            for m in methods:
                r = harness.run_case("bench_structured", f"{m}:{row}", warm=warm)
                harness.keep_fastest(res, m, r)
        for m in methods:
            r, b = res[m], res[BASELINE[m]]
            lines.append(
                f"| {row} | {LABELS[m]} | {1e3 * r['warm_s']:.2f} | {r['peak_mib']:.1f} | "
                f"{harness.fmt_ratio(r['warm_s'], b['warm_s'])} | "
                f"{harness.fmt_ratio(r['peak_mib'], max(b['peak_mib'], 1e-9))} |"
            )
        print("\n".join(lines[-len(methods):]), flush=True)
    print("\n" + "\n".join(lines))
    transformer_table(quick, repeat)
    resnet_table(quick, repeat)
    wide_table(quick, repeat)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(CASES)
    else:
        main()
