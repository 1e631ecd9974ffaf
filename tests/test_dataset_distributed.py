"""so.dataset_loss with a process group: two gloo processes on the CPU against the single-process result.

One launch of two ranks (forked from the test process, one thread each, a free
port) runs every check and sends its results back; the test process compares
every rank's result with the single-process result on the union of the shards,
computed before the fork. Uneven shards: rank 0 holds 4 batches (32 samples),
rank 1 holds 2 (7 samples); then rank 1 holds none.
"""

import contextlib
import datetime
import io
import json
import os
import pickle
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import secorder as so
from secorder import distributed

DT = torch.float64
BOUNDS = [0, 8, 16, 24, 32, 37, 39]
LAYOUTS = {"uneven": (4, 6), "empty": (6, 6)}  # rank 0 takes batches [0, k), rank 1 [k, 6)
LAUNCH_TIMEOUT = 240


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(39, 4, dtype=DT, generator=g), torch.randint(0, 3, (39,), generator=g)
    batches = [(x[a:b], y[a:b]) for a, b in zip(BOUNDS[:-1], BOUNDS[1:])]
    return model, f, batches


def _declined():
    """A classifier whose last batch is one unbatched sample ([4] inputs, a 0-dim target), which the structured
    engine declines (Linear on a 1-D input) and the generic path takes (PyTorch's unbatched cross-entropy)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 4, dtype=DT, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    batches.append((torch.randn(4, dtype=DT, generator=g), torch.tensor(1)))
    return model, f, batches


def cli_problem():
    """A --model factory for the report under two ranks: 5 batches of 6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,))) for _ in range(5)]
    return model, nn.functional.cross_entropy, data


def _quantities(F, p, rank, gen_seed):
    """Everything compared with the single-process result, as a dict of pytrees."""
    out = {}
    out["loss"] = F(p)
    out["value_and_grad"] = F.value_and_grad(p)
    for curvature in ("hessian", "ggn", "empirical_fisher"):
        out[f"diag_{curvature}"] = so.diagonal(F, curvature=curvature)(p)
    out["diag_generic"] = so.diagonal(F, engine="generic", chunk_size=20)(p)
    out["trace_ggn"] = so.trace(F, curvature="ggn")(p)
    est = so.trace_estimate(F, method="hutchinson", num_samples=6, chunk_size=3, seed=5)(p)
    out["hutchinson"] = (est.value, est.stderr, est.per_leaf)
    out["xdiag"] = so.diagonal_estimate(F, method="xdiag", num_samples=8, seed=5)(p).value
    # a generator seeded differently on every rank: rank 0's state is used by all
    gen = torch.Generator().manual_seed(gen_seed + rank)
    out["hutchpp_generator"] = so.trace_estimate(F, method="hutch++", num_samples=6, generator=gen)(p).value
    out["fisher"] = so.diagonal(F, curvature="fisher", seed=7)(p)
    out["fisher_generic"] = so.diagonal(F, curvature="fisher", seed=7, engine="generic")(p)
    v = {k: torch.ones_like(t) for k, t in p.items()}
    out["hvp"] = so.hvp(F)(p, v)
    out["ggn_vp"] = so.ggn_vp(F)(p, v)
    out["eigenvalues"] = so.eigenvalues(F, k=2, seed=0)(p)
    d = so.spectral_density(F, num_probes=2, num_iterations=4, seed=0)(p)
    out["density"] = (d.nodes, d.weights)
    # K-FAC: factors summed over batches and ranks (a rank without batches takes the layers from another)
    out["kfac"] = so.kfac(F, kfac_approx="reduce")(p).to_dense()
    out["ekfac_mc"] = so.ekfac(F, fisher_type="mc", mc_samples=2, seed=3)(p).to_dense()
    out["trace_kfac"] = so.trace(F, curvature="kfac")(p)
    return out


def _references():
    model, f, batches = _problem()
    p = so.params_dict(model)
    F = so.dataset_loss(f, batches)
    refs = {"main": _quantities(F, p, 0, 11)}
    refs["sum"] = so.diagonal(so.dataset_loss(f, batches, reduction="sum"), curvature="ggn")(p)
    rmodel, rf, rbatches = _declined()
    fn = so.diagonal(so.dataset_loss(rf, rbatches), curvature="ggn")
    refs["declined"] = fn(so.params_dict(rmodel))
    assert fn.last_engine == "generic"
    return refs


def _expect_error(results, key, fn, error):
    try:
        fn()
    except error as err:
        results[key] = f"{type(err).__name__}: {err}"
    except Exception as err:  # the wrong type: report it
        results[key] = f"WRONG {type(err).__name__}: {err}"
    else:
        results[key] = "no error"


def _checks(rank):
    results = {}
    torch.manual_seed(100 + rank)  # the global RNGs differ between the ranks
    group = torch.distributed.group.WORLD
    model, f, batches = _problem()
    p = so.params_dict(model)
    for layout, (k, _) in LAYOUTS.items():
        shard = batches[:k] if rank == 0 else batches[k:]
        F = so.dataset_loss(f, shard, process_group=group)
        results[layout] = _quantities(F, p, rank, 11)
        # the global RNG, drawn differently on each rank: rank 0 draws and broadcasts
        results[layout]["global_rng"] = so.trace_estimate(F, method="hutchinson", num_samples=4)(p).value
    shard = batches[:4] if rank == 0 else batches[4:]
    results["sum"] = so.diagonal(so.dataset_loss(f, shard, reduction="sum", process_group=group), curvature="ggn")(p)
    results["progress"] = so.dataset_loss(f, shard, progress=True, process_group=group).progress_setting() is True

    # one rank's batch declined by the structured engine: every rank falls back to the generic path
    rmodel, rf, rbatches = _declined()
    rshard = rbatches[:2] if rank == 0 else rbatches[2:]
    fn = so.diagonal(so.dataset_loss(rf, rshard, process_group=group), curvature="ggn")
    results["declined"] = fn(so.params_dict(rmodel))
    results["declined_engine"] = fn.last_engine

    # bad input on one rank: every rank raises, nobody hangs, the group stays usable
    other = {k: t.clone() for k, t in p.items()}
    if rank == 1:
        other["2.bias"] = torch.zeros(4, dtype=DT)
    F = so.dataset_loss(f, shard, process_group=group)
    _expect_error(results, "shapes", lambda: so.trace(F)(other), ValueError)
    bad = shard if rank == 0 else shard + [(batches[0][0][:3], batches[0][1][:4])]
    _expect_error(results, "bad_batch", lambda: so.diagonal(so.dataset_loss(f, bad, process_group=group))(p),
                  Exception)

    class Augmented:
        def __iter__(self):
            return iter([(x + 0.01 * torch.randn_like(x), y) for x, y in shard] if rank == 1 else shard)

    _expect_error(results, "deterministic",
                  lambda: so.trace(so.dataset_loss(f, Augmented(), process_group=group, check_deterministic=True))(p),
                  ValueError)
    results["after_errors"] = so.dataset_loss(f, shard, process_group=group)(p)

    # the command line under two ranks: shards, prints once
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from secorder.cli import main

        rc = main(["report", "--json", "--model", "tests.test_dataset_distributed:cli_problem", "--steps", "2",
                   "--num-samples", "4", "--batch-size", "4", "--dtype", "float64"])
    results["cli"] = (rc, out.getvalue())

    # a rank that never joins: the other times out with a clear error instead of hanging
    distributed.HANDSHAKE_TIMEOUT = datetime.timedelta(seconds=3)
    if rank == 0:
        _expect_error(results, "timeout", lambda: F(p), RuntimeError)
    else:
        time.sleep(6)
        torch.distributed.destroy_process_group()
        _expect_error(results, "not_initialised", lambda: so.dataset_loss(f, shard, process_group=group), ValueError)
    return results


def _worker(rank, port, queue):
    torch.set_num_threads(1)
    try:
        model, f, batches = _problem()
        # made before init_process_group: group.WORLD is None then, so this loss is one process's
        early = so.dataset_loss(f, batches[:1], process_group=torch.distributed.group.WORLD)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                             timeout=datetime.timedelta(seconds=120))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            early(so.params_dict(model))
            early(so.params_dict(model))
        results = _checks(rank)
        results["early_warnings"] = [str(w.message) for w in caught]
    except BaseException:
        results = {"crashed": traceback.format_exc()}
    queue.put(pickle.dumps((rank, results)))
    os._exit(0)  # no teardown of the half-broken group (the timeout check), no pytest handlers


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched():
    refs = _references()  # also warms up the transforms before the fork
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results, deadline = {}, time.monotonic() + LAUNCH_TIMEOUT
    while len(results) < 2 and time.monotonic() < deadline:
        if not queue.empty():
            rank, res = pickle.loads(queue.get())
            results[rank] = res
        else:
            time.sleep(0.1)
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    assert len(results) == 2, f"the ranks did not report within {LAUNCH_TIMEOUT} s: {sorted(results)}"
    for rank, res in results.items():
        assert "crashed" not in res, f"rank {rank}:\n{res['crashed']}"
    return refs, results


def close(a, b, rtol=1e-10, atol=1e-12):
    la, lb = so.tree.leaves(a), so.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_rank_gets_the_single_process_result(launched, layout):
    refs, results = launched
    for rank in (0, 1):
        got = results[rank][layout]
        for key, ref in refs["main"].items():
            tol = dict(rtol=1e-7, atol=1e-9) if key in ("eigenvalues", "density") else {}
            try:
                close(got[key], ref, **tol)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {layout}, {key}: {err}") from None
    close(results[0][layout]["global_rng"], results[1][layout]["global_rng"], rtol=0, atol=0)


def test_sum_and_declined_engine(launched):
    refs, results = launched
    for rank in (0, 1):
        close(results[rank]["sum"], refs["sum"])
        close(results[rank]["declined"], refs["declined"])
        assert results[rank]["declined_engine"] == "generic"
    assert results[0]["progress"] is True and results[1]["progress"] is False


def test_bad_input_on_one_rank_raises_on_every_rank(launched):
    _, results = launched
    for rank in (0, 1):
        assert results[rank]["shapes"].startswith("ValueError: the ranks of process_group disagree on the call")
        assert "['2.bias']:(4,)" in results[1]["shapes"] and "['2.bias']:(3,)" in results[0]["shapes"]
        assert results[rank]["deterministic"].startswith("ValueError: check_deterministic")
        close(results[rank]["after_errors"], results[0]["uneven"]["loss"])
    assert results[1]["bad_batch"].startswith("ValueError: data: batch 2 has targets of shape (4,)")
    assert results[0]["bad_batch"].startswith("RuntimeError: 1 other rank(s) of process_group failed")
    assert results[0]["timeout"].startswith("RuntimeError: rank 0: the other ranks of process_group did not join")
    assert results[1]["not_initialised"].startswith("ValueError: process_group: torch.distributed is not initialised")


def test_a_loss_made_before_init_process_group_warns_once(launched):
    _, results = launched
    for rank in (0, 1):
        (message,) = results[rank]["early_warnings"]
        assert "each rank computes the curvature of its own data alone" in message


def test_report_under_two_ranks_prints_once(launched):
    _, results = launched
    rc0, out0 = results[0]["cli"]
    rc1, out1 = results[1]["cli"]
    assert rc0 == 0 and rc1 == 0 and out1 == ""
    dist_report = json.loads(out0)
    assert dist_report["processes"] == 2 and dist_report["num_batches"] == 10 and dist_report["batch_size"] == 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from secorder.cli import main

        assert main(["report", "--json", "--model", "tests.test_dataset_distributed:cli_problem", "--steps", "2",
                     "--num-samples", "4", "--batch-size", "4", "--dtype", "float64"]) == 0
    single = json.loads(out.getvalue())
    assert single["processes"] == 1
    for a, b in zip(dist_report["phases"], single["phases"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["exact_trace"] == pytest.approx(b["exact_trace"], rel=1e-10)
        assert a["stochastic_trace"]["estimate"] == pytest.approx(b["stochastic_trace"]["estimate"], rel=1e-10)


def test_group_checks_without_initialised_distributed():
    """process_group when torch.distributed is not initialised in this process."""
    assert not distributed.is_initialized()
    with pytest.raises(TypeError, match="ProcessGroup"):
        so.dataset_loss(lambda p, x, y: p.sum(), [(1, 2)], process_group=object())
