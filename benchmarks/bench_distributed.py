"""An FSDP2-sharded MLP on 1, 2 and 4 gloo ranks: Hutchinson trace and top eigenvalue, time and memory per rank.

Run: ``python -m benchmarks.bench_distributed`` (``--quick``: fewer probes and Lanczos
steps, one warm call; ``--repeat=R`` rounds, each row keeping its fastest;
``--row=NAME`` for some rows: ``plain-1``, ``fsdp-1``, ``fsdp-2``, ``fsdp-4``,
``ddp-2``). Workload (issue 27): float32 on the CPU, an MLP 784-1024-256-10 with
tanh (1,068,810 parameters), cross-entropy, 64 batches of 8 synthetic samples,
one thread per process (``OMP_NUM_THREADS=1`` unless set).

* ``plain-1``: the unsharded model in one process, no process group (the
  single-device baseline);
* ``fsdp-W``: ``torchrun --nproc-per-node W``; every submodule with parameters and
  the root ``fully_shard``-ed on a 1-D mesh of the W ranks; rank ``r`` holds the
  contiguous ``64 / W`` batches ``r``; ``so.dataset_loss(..., process_group=WORLD)``;
* ``ddp-2``: the model wrapped in ``DistributedDataParallel`` on 2 ranks (the
  parameters replicated), for comparison with ``fsdp-2``.

Quantities: ``so.trace_estimate(F, method="hutchinson", num_samples=PROBES, seed=0)``
(one pass over the data with the probes vmapped) and
``so.eigenvalues(F, k=1, num_iterations=STEPS, seed=0)`` (``STEPS`` passes; a fixed
number of Lanczos steps, so every row does the same work). Per rank: the median
wall time of the warm calls, the process (CPU) time of a warm call, and the peak
resident set during the warm calls above the resident set before them (the
``harness`` measure, with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that
freed tensors leave the resident set: parameter shards, data and libraries are in
the baseline; the gathered parameters, probe blocks, activations and the Lanczos
basis are not).
The table shows the maximum over the ranks. The machine has 2 cores: with 4
ranks two processes share each core, so wall times there overstate what 4
devices would take; the CPU time per rank is the work each rank does.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from benchmarks import harness
from benchmarks.workloads import mlp

SIZES = (784, 1024, 256, 10)
NUM_BATCHES, BATCH = 64, 8
PROBES = {False: 10, True: 4}  # by --quick
STEPS = {False: 30, True: 10}
ROWS = ("plain-1", "fsdp-1", "fsdp-2", "fsdp-4", "ddp-2")


def workload():
    """The model (eval mode, float32) and the ``NUM_BATCHES`` batches ``(x, y)``, the same in every process."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = mlp(SIZES, nn.Tanh).eval()
    batches = [(torch.randn(BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (BATCH,), generator=g))
               for _ in range(NUM_BATCHES)]
    return model, batches


def _wrap(model, how: str, world: int):
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for name, module in reversed(list(model.named_modules())):
        if name and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _measure(fn, warm: int):
    cpu = []

    def timed():
        t = time.process_time()
        out = fn()
        cpu.append(time.process_time() - t)
        return out

    result = harness.measure(timed, warm=warm)
    result["cpu_s"] = statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0]
    return result


def run_row(how: str, quick: bool, warm: int):
    """This process's measurements (one rank of a row, or the plain row's only process)."""
    import secorder as so

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    group, rank, world = None, 0, 1
    if how != "plain":
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
        group, rank, world = torch.distributed.group.WORLD, torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, batches = workload()
    if how != "plain":
        model = _wrap(model, how, world)
    mine = batches[rank * NUM_BATCHES // world: (rank + 1) * NUM_BATCHES // world]
    F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), mine, process_group=group)
    params = so.params_dict(model)
    calls = {
        "hutchinson": lambda: so.trace_estimate(F, method="hutchinson", num_samples=PROBES[quick], seed=0)(params),
        "eigenvalue": lambda: so.eigenvalues(F, k=1, num_iterations=STEPS[quick], seed=0)(params),
    }
    out = {}
    for name, fn in calls.items():
        value = fn()
        out[name] = _measure(fn, warm)
        out[name]["value"] = float(value.value if hasattr(value, "value") else value[0])
    if group is None:
        return [out]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, out)
    return everyone


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(row: str, quick: bool, warm: int):
    how, world = row.split("-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(harness.REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    # a fixed malloc threshold: every large tensor is its own mapping, returned to the system when freed, so the
    # resident set follows the live tensors and its high-water mark is the peak (glibc's adaptive threshold would
    # keep the first call's blocks in the heap and hide the warm calls' peak)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    args = ["-m", "benchmarks.bench_distributed", "--rank-worker", how, str(int(quick)), str(warm)]
    if how == "plain":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=str(harness.REPO), env=env, capture_output=True, text=True, timeout=7200)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"row {row} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quick = "--quick" in sys.argv
    warm = 1 if quick else 2
    rows = harness.selected_rows(ROWS)
    best = {}
    for _ in range(harness.repeat_option(1)):
        for row in rows:
            ranks = launch(row, quick, warm)
            for q in ("hutchinson", "eigenvalue"):
                worst = {k: max(r[q][k] for r in ranks) for k in ("warm_s", "cpu_s", "peak_mib")}
                worst["value"] = ranks[0][q]["value"]
                print(f"{row} {q}: wall {worst['warm_s']:.2f} s, cpu {worst['cpu_s']:.2f} s, "
                      f"peak {worst['peak_mib']:.1f} MiB, value {worst['value']:.6g}", flush=True)
                harness.keep_fastest(best, f"{row}/{q}", worst)
    n = sum(p.numel() for p in workload()[0].parameters())
    lines = [f"MLP {'-'.join(map(str, SIZES))} tanh ({n:,} parameters), {NUM_BATCHES} batches of {BATCH}, float32, "
             f"CPU, gloo, one thread per process; Hutchinson {PROBES[quick]} probes, top eigenvalue "
             f"{STEPS[quick]} Lanczos steps; maximum over the ranks",
             "",
             "| row | quantity | wall (s) | CPU per rank (s) | peak extra memory per rank (MiB) | "
             "wall vs fsdp-1 | CPU vs fsdp-1 | memory vs fsdp-1 | value |",
             "|---|---|---|---|---|---|---|---|---|"]
    for q in ("hutchinson", "eigenvalue"):
        ref = best.get(f"fsdp-1/{q}")
        for row in rows:
            r = best[f"{row}/{q}"]
            ratios = ["n/a"] * 3 if ref is None else [
                harness.fmt_ratio(r["warm_s"], ref["warm_s"]), harness.fmt_ratio(r["cpu_s"], ref["cpu_s"]),
                harness.fmt_ratio(r["peak_mib"], ref["peak_mib"])]
            lines.append(f"| {row} | {q} | {r['warm_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mib']:.1f} | "
                         f"{' | '.join(ratios)} | {r['value']:.6g} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    if "--rank-worker" in sys.argv:
        i = sys.argv.index("--rank-worker")
        how, quick, warm = sys.argv[i + 1], bool(int(sys.argv[i + 2])), int(sys.argv[i + 3])
        result = run_row(how, quick, warm)
        if how == "plain" or torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
        if how != "plain":
            torch.distributed.destroy_process_group()
    else:
        main()
