"""One rank of tests/test_distributed_sharded.py, launched by torchrun (``python -m torch.distributed.run``).

``python -m torch.distributed.run --nproc-per-node N tests/sharded_worker.py OUT BACKEND``: every rank joins
the group from torchrun's environment (``init_process_group(backend)`` with ``env://``), runs every check on a
DDP-wrapped and an FSDP2-sharded MLP and small transformer block over its shard of the batches, and saves its
results to ``OUT/rank<r>.pt`` (sharded results as their gathered values and their placements). The test process
compares them with the single-process results of :func:`quantities` on the plain models and all the batches.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script by torchrun: the repository root on the path
    sys.path.insert(0, ROOT)

import secorder as so  # noqa: E402
from secorder import distributed, tree  # noqa: E402

DT = torch.float64
BOUNDS = [0, 8, 16, 23, 31, 37, 40]  # six batches of 8, 8, 7, 8, 6, 3 samples
#: each rank's batches [a, b): uneven, and with 4 ranks rank 1 holds none
LAYOUTS = {1: [(0, 6)], 2: [(0, 4), (4, 6)], 4: [(0, 2), (2, 2), (2, 5), (5, 6)]}
#: (model, wrapper) pairs run on every world size; the extra quantities run on 2 ranks, FSDP MLP only
CASES = (("mlp", "ddp"), ("mlp", "fsdp"), ("block", "fsdp"))
EXTRAS = (2, "mlp", "fsdp")
BASIS_STEPS = 8
#: the command line under torchrun (the test compares it with the same command in one process)
CLI = {2: ["report", "--shard", "fsdp", "--steps", "2", "--num-samples", "4", "--batch-size", "4"],
       4: ["spectrum", "--shard", "ddp", "--steps", "2", "-k", "1", "--num-probes", "1", "--num-iterations", "5"]}


class Block(nn.Module):
    """A pre-norm transformer block (attention and MLP with residuals) and a classifier on the mean token."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=True)[0]  # need_weights=False (SDPA) fails so.trace
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


def make_model(kind: str, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)) if kind == "mlp" else Block()
    return model.to(device=device, dtype=DT).eval()


def make_batches(kind: str, device="cpu"):
    g = torch.Generator().manual_seed(1)
    shape = (40, 5) if kind == "mlp" else (40, 4, 8)
    x, y = torch.randn(shape, dtype=DT, generator=g), torch.randint(0, 3, (40,), generator=g)
    x, y = x.to(device), y.to(device)
    return [(x[a:b], y[a:b]) for a, b in zip(BOUNDS[:-1], BOUNDS[1:])]


def conjugate_gradients(F, p, damping: float = 0.1, iterations: int = 6):
    """``(G + damping I) x = grad`` by CG on the GGN products, with tree.vdot (sharded inner products)."""
    b = F.value_and_grad(p)[1]
    gvp = so.ggn_vp(F)

    def apply(v):
        return tree.axpy(damping, v, gvp(p, v))

    x, r = tree.zeros_like(b), b
    d, rr = r, float(tree.vdot(r, r))
    for _ in range(iterations):
        ad = apply(d)
        alpha = rr / float(tree.vdot(d, ad))
        x, r = tree.axpy(alpha, d, x), tree.axpy(-alpha, ad, r)
        new = float(tree.vdot(r, r))
        d, rr = tree.axpy(new / rr, d, r), new
    return x, float(tree.norm(r))


def quantities(F, p, extras: bool):
    """Everything compared with the single process (the same code runs there on the plain model)."""
    out = {}
    out["loss"] = F(p)
    out["grad"] = F.value_and_grad(p)[1]
    out["trace"] = so.trace(F)(p)
    est = so.trace_estimate(F, method="hutchinson", num_samples=6, chunk_size=4, seed=5)(p)
    out["hutchinson"] = (est.value, est.stderr, est.per_leaf)
    out["ggn_diag"] = so.diagonal(F, curvature="ggn")(p)
    out["eigenvalues"] = so.eigenvalues(F, k=2, num_iterations=15, seed=0)(p)
    out["solve"] = conjugate_gradients(F, p)
    if extras:
        out["top_adaptive"] = so.eigenvalues(F, k=1, seed=0)(p)
        out["fisher_diag"] = so.diagonal(F, curvature="fisher", seed=7, engine="generic")(p)
        out["hvp"] = so.hvp(F)(p, tree.tree_map(torch.ones_like, p))
        _, vectors = so.eigenvalues(F, k=2, num_iterations=12, seed=0, return_eigenvectors=True)(p)
        out["eigenvectors"] = vectors
        density = so.spectral_density(F, num_probes=2, num_iterations=6, seed=0)(p)
        out["density"] = (density.nodes, density.weights)
        out["xdiag"] = so.diagonal_estimate(F, method="xdiag", num_samples=8, seed=5)(p).value
        out["per_leaf_eigenvalues"] = so.eigenvalues(F, k=1, seed=0, per_leaf=True, num_iterations=6)(p)
    return out


def frozen_quantities(F, p):
    """The MLP with its first bias frozen (not differentiated, a constant of the model)."""
    return {"loss": F(p), "trace": so.trace(F)(p), "ggn_diag": so.diagonal(F, curvature="ggn")(p)}


def cli_problem():
    """A --model factory for the command line under torchrun: 5 batches of 6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,))) for _ in range(5)]
    return model, nn.functional.cross_entropy, data


def record(value):
    """A result made storable: ``DTensor`` leaves as ``("DTensor", placements, local shape, gathered)``."""
    def one(t):
        if so.wrappers.is_dtensor(t):
            return ("DTensor", str(tuple(t.placements)), tuple(t.to_local().shape), t.full_tensor().cpu())
        return t.detach().cpu() if isinstance(t, torch.Tensor) else t
    return tree.tree_map(one, value)


def wrap(model: nn.Module, how: str, mesh, device):
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for name, module in reversed(list(model.named_modules())):  # children before their parents
        if name and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def expect_error(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is part of what is checked
        return f"{type(err).__name__}: {err}"
    return "no error"


def checks(rank: int, world: int, device, backend: str):
    from torch.distributed.device_mesh import init_device_mesh

    group = torch.distributed.group.WORLD
    mesh = init_device_mesh(device.type, (world,))
    a, b = LAYOUTS[world][rank]
    results = {}
    torch.manual_seed(100 + rank)  # the global RNGs differ between the ranks
    for kind, how in CASES:
        batches = make_batches(kind, device)
        model = wrap(make_model(kind, device), how, mesh, device)
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        F = so.dataset_loss(f, batches[a:b], process_group=group)
        p = so.params_dict(model)
        results[f"{kind}/{how}"] = record(quantities(F, p, (world, kind, how) == EXTRAS))
        results[f"{kind}/{how}/placements"] = {k: str(tuple(v.placements)) if so.wrappers.is_dtensor(v) else None
                                               for k, v in p.items()}

    # a frozen parameter (left out of params_dict): the twin gathers it once per call
    batches = make_batches("mlp", device)
    model = make_model("mlp", device)
    model[0].bias.requires_grad_(False)
    model = wrap(model, "fsdp", mesh, device)
    F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), batches[a:b], process_group=group)
    p = so.params_dict(model)
    results["frozen"] = record(frozen_quantities(F, p))
    # f calling the sharded model itself (FSDP2's forward would use its own parameters): refused
    direct = so.dataset_loss(lambda q, x, y: nn.functional.cross_entropy(torch.func.functional_call(model, q, (x,)), y),
                             batches[rank:rank + 1], process_group=group)
    results["direct_fsdp_call"] = expect_error(lambda: so.trace(direct)(p))

    # memory per rank of the Lanczos basis: the entries of the Krylov buffer of one run
    from secorder.estimators import lanczos

    sizes = []
    original = lanczos.Krylov._alloc

    def alloc(self, like):
        original(self, like)
        sizes.append(self._Q.numel())

    for how in ("ddp", "fsdp"):
        model = wrap(make_model("block", device), how, mesh, device)
        F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), make_batches("block", device)[a:b],
                            process_group=group)
        lanczos.Krylov._alloc = alloc
        try:
            so.eigenvalues(F, k=1, num_iterations=BASIS_STEPS, seed=0)(so.params_dict(model))
        finally:
            lanczos.Krylov._alloc = original
        results[f"basis_entries/{how}"] = sizes[-1]

    # bad input, raised on every rank
    batches = make_batches("mlp", device)
    model = wrap(make_model("mlp", device), "fsdp", mesh, device)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    F = so.dataset_loss(f, batches[a:b], process_group=group)
    p = so.params_dict(model)
    mixed = dict(p, **{"2.bias": p["2.bias"].full_tensor()})
    results["mixed"] = expect_error(lambda: so.trace(F)(mixed))
    singletons = [torch.distributed.new_group([r]) for r in range(world)]
    other = so.dataset_loss(f, batches[a:b], process_group=singletons[rank])
    results["mesh_mismatch"] = expect_error(lambda: so.trace(other)(p))
    plain_model = make_model("mlp", device)
    stale = so.params_dict(plain_model)
    late = wrap(plain_model, "fsdp", mesh, device)  # sharded after params_dict was taken
    results["stale_fsdp"] = expect_error(
        lambda: so.trace(so.dataset_loss(so.functional_loss(late, nn.CrossEntropyLoss()), batches[rank:rank + 1],
                                         process_group=group))(stale))
    plain_model = make_model("mlp", device)
    stale = so.params_dict(plain_model)
    late = wrap(plain_model, "ddp", mesh, device)
    results["stale_ddp"] = expect_error(
        lambda: so.trace(so.dataset_loss(so.functional_loss(late, nn.CrossEntropyLoss()), batches[rank:rank + 1],
                                         process_group=group))(stale))
    results["no_group"] = expect_error(lambda: so.trace(so.dataset_loss(f, batches[rank:rank + 1]))(p))
    results["plain_f"] = expect_error(lambda: so.trace(f)(p, *batches[0]))
    v = {k: (t.full_tensor() if k == "0.weight" else t) for k, t in p.items()}
    results["plain_tangent"] = expect_error(lambda: so.hvp(F)(p, v))
    bad = batches[a:b] if rank != world - 1 else batches[a:b] + [(batches[0][0][:3], batches[0][1][:4])]
    results["bad_batch"] = expect_error(lambda: so.diagonal(so.dataset_loss(f, bad, process_group=group))(p))
    results["after_errors"] = record(F(p))

    if backend == "gloo":  # the command line (CPU only here), printing on rank 0
        from secorder.cli import main

        command = CLI[world]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main([*command, "--json", "--model", "tests.sharded_worker:cli_problem", "--dtype", "float64"])
        results["cli"] = (rc, out.getvalue())

    # a rank that fails before the call: every other rank raises within the handshake timeout
    distributed.HANDSHAKE_TIMEOUT = datetime.timedelta(seconds=3)
    if rank == 1:
        results["failing_rank"] = expect_error(lambda: so.trace(F)(mixed))
        time.sleep(8)
    else:
        start = time.monotonic()
        results["failing_rank"] = expect_error(lambda: so.trace(F)(p))
        results["failing_rank_seconds"] = time.monotonic() - start
    return results


def main(out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        world = int(os.environ["WORLD_SIZE"])
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=120))  # torchrun's env://
        results = checks(rank, world, device, backend)
    except BaseException:  # noqa: BLE001 - reported to the test process
        results = {"crashed": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # no teardown of the group the timeout check left broken


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
