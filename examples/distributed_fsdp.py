"""The top Hessian eigenvalue and trace of an FSDP2-sharded model over a data set sharded across ranks.

Run it under torchrun (gloo on the CPU here; NCCL with one GPU per rank works the same way):

    torchrun --nproc-per-node 2 examples/distributed_fsdp.py

Run plainly (``python examples/distributed_fsdp.py``) it launches itself under torchrun on 2 processes.

Every rank builds the same model, shards it with ``fully_shard`` (each parameter split over the ranks),
takes its own batches, and calls the secorder transforms on ``so.params_dict(model)``: the parameters are
``DTensor`` shards, gathered once per call; every product is a pass over this rank's batches and one
all-reduce; Lanczos keeps its basis in shards like the parameters. Scalars come back equal on every rank,
results shaped like the parameters as ``DTensor`` shards (``.full_tensor()`` gathers one).
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import secorder as so


def main():
    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    g = torch.Generator().manual_seed(1)  # the data set: 16 batches of 32; rank r takes batches r, r + world, ...
    batches = [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(16)]
    F = so.dataset_loss(so.functional_loss(model, nn.CrossEntropyLoss()), batches[rank::world],
                        process_group=dist.group.WORLD)
    params = so.params_dict(model)  # DTensor shards

    top = so.eigenvalues(F, k=1, seed=0)(params)
    trace = so.trace(F)(params)
    estimate = so.trace_estimate(F, num_samples=50, seed=0)(params)
    diag = so.diagonal(F, curvature="ggn")(params)  # DTensor shards, placed like the parameters
    local = diag["0.weight"].to_local().shape
    if rank == 0:
        print(f"{world} ranks, {so.tree.size(params)} parameters, each rank holds ~1/{world} of every weight")
        print(f"top eigenvalue of the Hessian: {float(top[0]):.6f}")
        print(f"Hessian trace (exact): {float(trace):.6f}; Hutchinson with 50 probes: "
              f"{float(estimate.value):.4f} +- {float(estimate.stderr):.4f}")
        print(f"GGN diagonal of '0.weight': a {type(diag['0.weight']).__name__} of shape "
              f"{tuple(diag['0.weight'].shape)}, {tuple(local)} on this rank")
    full = diag["0.weight"].full_tensor()  # a collective: every rank calls it
    if rank == 0:
        print(f"gathered with full_tensor(): {tuple(full.shape)}, sum {float(full.sum()):.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:  # run plainly: launch this script under torchrun on 2 processes
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  __file__], env=env))
