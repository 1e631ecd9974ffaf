"""DDP-wrapped and FSDP2-sharded models under torchrun (gloo, 2 and 4 ranks) against one process.

Each world size is one ``python -m torch.distributed.run`` launch of :mod:`tests.sharded_worker`: every rank
joins the group from torchrun's environment, computes the loss, the gradient, the exact Hessian trace, a seeded
Hutchinson estimate, the GGN diagonal, the top eigenvalues and a damped Gauss-Newton solve (CG with
``tree.vdot``) of an MLP (DDP and FSDP2) and a small transformer block (FSDP2) over its shard of six uneven
batches (with 4 ranks one rank has none; the parameters' shards are uneven and some are empty), plus errors,
the memory of a sharded Lanczos basis, the command line and a rank that fails. This process computes the same
quantities with the plain models on all the batches and compares: every rank must give the single-process
result to float64 rounding, sharded results as DTensors with the parameters' placements, scalars equal on every
rank. NCCL (the GPU path) runs the same worker when CUDA devices are present.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

import secorder as so
from tests import sharded_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT = 420


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, backend: str = "gloo"):
    """Run the worker under torchrun on ``world`` ranks; every rank's results."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={_free_port()}", os.path.join(ROOT, "tests", "sharded_worker.py"), out, backend]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        results = {}
        for rank in range(world):
            path = os.path.join(out, f"rank{rank}.pt")
            assert os.path.exists(path), f"rank {rank} wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            results[rank] = torch.load(path, weights_only=False)
            assert "crashed" not in results[rank], f"rank {rank}:\n{results[rank]['crashed']}"
    return results


@pytest.fixture(scope="module")
def references():
    refs = {}
    for kind in dict.fromkeys(kind for kind, _ in worker.CASES):
        model = worker.make_model(kind)
        F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), worker.make_batches(kind))
        refs[kind] = worker.quantities(F, so.params_dict(model), extras=kind == worker.EXTRAS[1])
    model = worker.make_model("mlp")
    model[0].bias.requires_grad_(False)
    F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), worker.make_batches("mlp"))
    refs["frozen"] = worker.frozen_quantities(F, so.params_dict(model))
    return refs


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def launched(request):
    return request.param, launch(request.param)


def _strip(value):
    """Sharded records ``("DTensor", placements, local shape, full)`` to their full tensors (recursively)."""
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "DTensor":
        return value[3]
    if isinstance(value, dict):
        return {k.removeprefix("module."): _strip(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_strip(v) for v in value)
    return value


def _sharded_leaves(value, found):
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "DTensor":
        found.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _sharded_leaves(v, found)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _sharded_leaves(v, found)
    return found


def close(got, ref, what, rtol=1e-10, atol=1e-12):
    got, ref = _strip(got), _strip(ref)
    if isinstance(ref, dict):
        assert set(got) == set(ref), f"{what}: keys {sorted(got)} != {sorted(ref)}"
        for k in ref:
            close(got[k], ref[k], f"{what}[{k!r}]", rtol, atol)
    elif isinstance(ref, (tuple, list)):
        assert len(got) == len(ref), what
        for i, (g, r) in enumerate(zip(got, ref)):
            close(g, r, f"{what}[{i}]", rtol, atol)
    elif isinstance(ref, torch.Tensor):
        torch.testing.assert_close(got, ref.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert got == pytest.approx(ref, rel=rtol, abs=atol), what


TOLERANCES = {"eigenvalues": dict(rtol=1e-8, atol=1e-10), "top_adaptive": dict(rtol=1e-8, atol=1e-10),
              "eigenvectors": dict(rtol=1e-6, atol=1e-8), "density": dict(rtol=1e-7, atol=1e-9),
              "per_leaf_eigenvalues": dict(rtol=1e-8, atol=1e-10), "solve": dict(rtol=1e-8, atol=1e-10)}


def test_every_rank_gets_the_single_process_result(launched, references):
    world, results = launched
    for kind, how in worker.CASES:
        ref = references[kind]
        for rank in range(world):
            got = results[rank][f"{kind}/{how}"]
            wanted = set(ref) if (world, kind, how) == worker.EXTRAS else {
                k for k in ref if k in ("loss", "grad", "trace", "hutchinson", "ggn_diag", "eigenvalues", "solve")}
            assert set(got) == wanted, f"{kind}/{how}: {sorted(got)}"
            for key in wanted:
                close(got[key], ref[key], f"{world} ranks, rank {rank}, {kind}/{how}, {key}", **TOLERANCES.get(key, {}))


def test_frozen_sharded_parameters_are_gathered_as_constants(launched, references):
    world, results = launched
    for rank in range(world):
        close(results[rank]["frozen"], references["frozen"], f"rank {rank}, frozen bias")
        assert "0.bias" not in results[rank]["frozen"]["ggn_diag"]


def test_scalars_are_equal_on_every_rank(launched):
    world, results = launched
    for kind, how in worker.CASES:
        first = results[0][f"{kind}/{how}"]
        for rank in range(1, world):
            other = results[rank][f"{kind}/{how}"]
            for key in ("loss", "trace", "hutchinson", "eigenvalues"):
                close(other[key], first[key], f"rank {rank} {kind}/{how} {key}", rtol=0, atol=0)


def test_sharded_results_are_dtensors_with_the_parameters_placements(launched):
    world, results = launched
    for kind, how in worker.CASES:
        for rank in range(world):
            got = results[rank][f"{kind}/{how}"]
            placements = results[rank][f"{kind}/{how}/placements"]
            for key in ("grad", "ggn_diag", "solve"):
                shards = _sharded_leaves(got[key], [])
                if how == "ddp":
                    assert not shards, f"{kind}/ddp {key}: plain tensors expected"
                    continue
                assert len(shards) == len(placements), f"{kind}/fsdp {key}: {len(shards)} sharded leaves"
                assert all(s[1] == pl for s, pl in zip(shards, placements.values())), (key, shards[0][1])
            for key in ("loss", "trace", "eigenvalues"):
                assert not _sharded_leaves(got[key], []), f"{kind}/{how} {key} is a scalar result, not a shard"
    if world == 2:
        vectors = _sharded_leaves(results[0]["mlp/fsdp"]["eigenvectors"], [])
        assert vectors and all(s[1] == "(Shard(dim=1),)" for s in vectors)  # shifted past the k dimension


def test_the_lanczos_basis_shrinks_with_the_world_size(launched, references):
    world, results = launched
    n = so.tree.size(so.params_dict(worker.make_model("block")))
    basis = [results[r]["basis_entries/fsdp"] for r in range(world)]
    assert sum(basis) == (worker.BASIS_STEPS + 1) * n  # every entry held once, over the ranks
    assert max(basis) <= (worker.BASIS_STEPS + 1) * (n // world + 40)  # rows split like torch.chunk
    assert all(results[r]["basis_entries/ddp"] == (worker.BASIS_STEPS + 1) * n for r in range(world))


def test_bad_input_is_named_on_every_rank(launched):
    world, results = launched
    for rank in range(world):
        res = results[rank]
        assert res["mixed"].startswith("ShardingError: params mixes sharded and unsharded tensors")
        assert "params['2.bias'] is a plain tensor" in res["mixed"]
        assert res["mesh_mismatch"].startswith("ShardingError: process_group does not match the device mesh")
        assert f"spans ranks {list(range(world))}, process_group spans [{rank}]" in res["mesh_mismatch"]
        assert res["stale_fsdp"].startswith("ValueError: params['0.weight'] is a plain tensor")
        assert "params were taken before fully_shard" in res["stale_fsdp"]
        assert res["stale_ddp"].startswith("ValueError: params has names without the 'module.' prefix")
        assert res["no_group"].startswith("ShardingError: params['0.bias'] is sharded") and "process group" in res[
            "no_group"]
        assert res["plain_f"] == res["no_group"]
        assert res["plain_tangent"].startswith("ShardingError: v['0.weight'] is a plain tensor")
        assert res["direct_fsdp_call"].startswith("RuntimeError: f called the forward of an FSDP2 module")
        close(res["after_errors"], results[0]["mlp/fsdp"]["loss"], "the group is usable after the errors")
    last = world - 1
    a, b = worker.LAYOUTS[world][last]
    assert results[last]["bad_batch"].startswith(f"ValueError: data: batch {b - a} has targets of shape (4,)")
    for rank in range(last):
        assert results[rank]["bad_batch"].startswith("RuntimeError: 1 other rank(s) of process_group failed")


def test_a_rank_that_fails_makes_every_rank_raise_within_the_timeout(launched):
    world, results = launched
    assert results[1]["failing_rank"].startswith("ShardingError: params mixes")
    for rank in [r for r in range(world) if r != 1]:
        assert results[rank]["failing_rank"].startswith(
            f"RuntimeError: rank {rank}: the other ranks of process_group did not join this call within 3 s")


def _single_process_cli(command):
    import contextlib
    import io

    from secorder.cli import main

    args = list(command)
    i = args.index("--shard")
    args[i + 1] = "none"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json", "--model", "tests.sharded_worker:cli_problem", "--dtype", "float64"]) == 0
    return json.loads(out.getvalue())


def test_the_command_line_under_torchrun_prints_once_and_matches_one_process(launched):
    world, results = launched
    rc, out = results[0]["cli"]
    assert rc == 0
    for rank in range(1, world):
        assert results[rank]["cli"] == (0, "")
    report = json.loads(out)
    command = worker.CLI[world]
    single = _single_process_cli(command)
    assert report["shard"] == command[command.index("--shard") + 1] and single["shard"] == "none"
    assert report["processes"] == world and single["processes"] == 1
    for a, b in zip(report["phases"], single["phases"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        if command[0] == "report":
            assert a["exact_trace"] == pytest.approx(b["exact_trace"], rel=1e-10)
            assert a["stochastic_trace"]["estimate"] == pytest.approx(b["stochastic_trace"]["estimate"], rel=1e-10)
            assert a["per_param_trace"] == pytest.approx(b["per_param_trace"], rel=1e-9)
        else:
            assert a["top_eigenvalues"] == pytest.approx(b["top_eigenvalues"], rel=1e-8)
            assert a["density"]["trace"] == pytest.approx(b["density"]["trace"], rel=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL is the GPU path: this machine has no CUDA device")
def test_nccl_under_torchrun(references):
    world = min(2, torch.cuda.device_count())
    results = launch(world, "nccl")
    for kind, how in worker.CASES:
        for rank in range(world):
            got = results[rank][f"{kind}/{how}"]
            for key in ("loss", "trace", "hutchinson", "ggn_diag", "eigenvalues", "solve"):
                close(got[key], references[kind][key], f"nccl rank {rank} {kind}/{how} {key}", rtol=1e-8, atol=1e-10)
