"""Memory parallelism on 2 gloo ranks: a memory layer whose value table is sharded by columns gives
each rank the outputs and, summed over the ranks, every gradient of the same layer run whole in
one process on all the tokens; float64 gradcheck of the sharded bag's score path.

The test runs this file under torchrun; `worker()` holds the checks (every rank asserts)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def worker() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lingua.optim import clip_grad_norm, grad_of
    from lingua.product_key import HashingMemory, ProductKeyArgs, shard_value_tables
    from lingua.product_key.colwise_embeddingbag import colwise_bag

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("memory_replicate", "memory_shard"))
    torch.manual_seed(0)  # the same layer and tokens on every rank
    args = ProductKeyArgs(is_enabled=True, layers="0", mem_n_keys=8, mem_heads=2, mem_knn=4, mem_k_dim=8)
    whole = HashingMemory(16, args, 0)
    whole.init_weights()
    sharded = copy.deepcopy(whole)
    shard_value_tables(sharded, mesh, divisor=world)
    assert sharded.values.weight.shape == (64, 16 // world)
    x = torch.randn(world, 5, 16)

    out_whole = whole(x)
    out_mine = sharded(x[rank : rank + 1])
    torch.testing.assert_close(out_mine, out_whole[rank : rank + 1], rtol=1e-5, atol=1e-6)

    grad_out = torch.randn(out_whole.shape)
    out_whole.backward(grad_out)
    out_mine.backward(grad_out[rank : rank + 1])
    # Dense parameters: each rank's gradient covers its tokens; their sum is the whole run's.
    for (name, p_whole), p_mine in zip(whole.named_parameters(), sharded.parameters()):
        if name.startswith("values"):
            continue
        summed = p_mine.grad.clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed, p_whole.grad, rtol=1e-5, atol=1e-6, msg=name)
    # The value slice: a row-sparse gradient over every token of the group, for this rank's columns.
    width = 16 // world
    mine, expected = grad_of(sharded.values.weight).coalesce(), whole.values.weight.grad.to_dense()
    torch.testing.assert_close(mine.to_dense(), expected[:, rank * width : (rank + 1) * width], rtol=1e-5, atol=1e-6)
    # The clipping norm of the value gradient spans both slices.
    norm = clip_grad_norm([sharded.values.weight], 0.0)
    torch.testing.assert_close(norm, expected.norm(), rtol=1e-5, atol=1e-6)

    table = torch.randn(30, 4 * world, dtype=torch.float64)
    local = table[:, rank * 4 : (rank + 1) * 4].clone()
    rows = torch.randint(0, 30, (3, 5))
    weights = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    sharding = sharded.values.weight.column_sharding
    assert torch.autograd.gradcheck(lambda w: colwise_bag(local, rows, w, sharding, "torch"), (weights,))
    print(f"rank {rank}: sharded layer matches", flush=True)
    dist.destroy_process_group()


def test_sharded_memory_layer_matches_whole_layer():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0: sharded layer matches" in result.stdout and "rank 1: sharded layer matches" in result.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker()
