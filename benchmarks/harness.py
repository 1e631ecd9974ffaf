"""Shared benchmark harness: every measurement in its own subprocess, reported as ratios.

Each measurement (one method on one workload) runs in a fresh Python process so
that peak memory can be read from the process's resident set: the peak RSS
during the measured calls minus the RSS just before them. Wall times are the
first call (including any tracing/compilation) and the median of warm calls.

A benchmark module defines ``CASES``: a dict mapping a case name to a function
that does the setup and returns a zero-argument callable to time. Peers whose
import name clashes with ours (``torch-secorder==0.0.1``) run in processes whose
``PYTHONPATH`` starts with their own install target, see :func:`peer_path`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / ".bench_peers"

# Peers installed side by side with their own target so the import name does not clash.
ISOLATED_PEERS = {"torch_secorder_001": "torch-secorder==0.0.1"}


def peer_path(name: str) -> Path:
    """Install (once) an isolated peer into ``.bench_peers/<name>`` and return the folder."""
    target = PEERS / name
    if not (target / ".installed").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
             ISOLATED_PEERS[name]],
            check=True,
        )
        (target / ".installed").write_text(ISOLATED_PEERS[name])
    return target


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _max_rss_bytes()


def measure(fn: Callable[[], object], warm: int = 5) -> Dict[str, float]:
    """Time ``fn``: first call, then the median of ``warm`` calls.

    Peak memory is measured over the warm calls only (after the first call has
    loaded code and caches): the resident-set high-water mark, reset just
    before them, minus the resident set at that point, in MiB.
    """
    import torch

    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    import gc

    gc.collect()
    _reset_peak_rss()
    base = _rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    times = []
    for _ in range(warm):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    out = {
        "first_s": first,
        "warm_s": statistics.median(times) if times else first,
        "peak_mib": max(0, _peak_rss_bytes() - base) / 2**20,
    }
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return out


def worker_main(cases: Dict[str, Callable[[], Callable[[], object]]]) -> None:
    """Entry point of a measurement subprocess: ``--worker CASE [--warm N]``."""
    args = sys.argv[1:]
    name = args[args.index("--worker") + 1]
    warm = int(args[args.index("--warm") + 1]) if "--warm" in args else 5
    import torch

    torch.manual_seed(0)
    fn = cases[name]()
    result = measure(fn, warm=warm)
    print("RESULT " + json.dumps(result))


def run_case(module: str, case: str, warm: int = 5, peer: Optional[str] = None,
             timeout: float = 1800) -> Dict[str, float]:
    """Run one case of ``benchmarks.<module>`` in a subprocess and return its measurements."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if peer is not None:
        paths.insert(0, str(peer_path(peer)))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--worker", case, "--warm", str(warm)],
        cwd=str(REPO if peer is None else PEERS), env=env, capture_output=True, text=True, timeout=timeout,
    )
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}x" if den > 0 else "n/a"


def selected_rows(rows: Iterable[str]) -> List[str]:
    """The rows named by ``--row=NAME`` arguments, in the benchmark's order (every row without one)."""
    chosen = [a[len("--row="):] for a in sys.argv if a.startswith("--row=")]
    return [r for r in rows if not chosen or r in chosen]


def repeat_option(default: int) -> int:
    """The number of rounds: ``--repeat=R``, else ``default``."""
    return next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--repeat=")), default)


def keep_fastest(best: Dict[str, Dict[str, float]], key: str, result: Dict[str, float]) -> None:
    """Keep ``result`` under ``key`` if it is the first or the fastest warm run so far (rounds interleave cases)."""
    if key not in best or result["warm_s"] < best[key]["warm_s"]:
        best[key] = result
