"""Memory parallelism: a value table sharded by columns over the ranks of a memory-parallel group.

With `distributed.memory_parallel_size = P`, ranks come in groups of P consecutive ranks; each rank
of a group holds columns [r V/P, (r+1) V/P) of every row (`shard_columns`), so the group holds one
table in 1/P of the memory per rank. A read of the table (`colwise_bag`) by the group:
  1. all-gather the group's bags (rows and weights of its P x N tokens),
  2. each rank forms the weighted bag of its column slice for all P x N tokens,
  3. all-to-all: each rank gets back its own N tokens' slices from every rank -> [N, V].
Backward: the reverse all-to-all; the local bag backward gives the slice's row-sparse gradient
(summed over the group's tokens) and partial score gradients, which the all-gather's backward sums
over the slices (reduce-scatter). Every rank of a group must read the same number of tokens.

Ranks holding the same slice in different groups are replicas: the optimizer averages their
gradients (`lingua.optim.all_reduce_row_grads`, through the `ColumnSharding` the parameter
carries), clipping sums the slices' norms, and checkpoints see one [R, V] table (a DTensor sharded
on columns), so a checkpoint loads into any layout, one process included.
Shapes: N tokens per rank, L entries per bag, R rows, V row width, P group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lingua.args import ConfigError
from lingua.optim import ColumnSharding
from lingua.product_key.embedding_bag import Backend, weighted_embedding_bag


def _group_size_rank(group: dist.ProcessGroup) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


class _AllGatherScores(torch.autograd.Function):
    """[N, L] per rank -> [P N, L] (the group's bags, in rank order); backward: the sum over the
    group of the gradients of my rows (reduce-scatter; all-reduce where the backend has none)."""

    @staticmethod
    def forward(ctx, weights_NL: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size, _ = _group_size_rank(group)
        gathered = weights_NL.new_empty((size * weights_NL.shape[0],) + tuple(weights_NL.shape[1:]))
        dist.all_gather_into_tensor(gathered, weights_NL.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad_PNL: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        size, rank = _group_size_rank(ctx.group)
        grad_PNL = grad_PNL.contiguous()
        n = grad_PNL.shape[0] // size
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:
            dist.all_reduce(grad_PNL, group=ctx.group)
            return grad_PNL[rank * n : (rank + 1) * n], None
        mine = grad_PNL.new_empty((n,) + tuple(grad_PNL.shape[1:]))
        dist.reduce_scatter_tensor(mine, grad_PNL, group=ctx.group)
        return mine, None


class _ExchangeColumns(torch.autograd.Function):
    """[P N, V/P] (every token of the group, my columns) -> [N, V] (my tokens, every column);
    the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, local_PNS: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size, _ = _group_size_rank(group)
        received = torch.empty_like(local_PNS)
        dist.all_to_all_single(received, local_PNS.contiguous(), group=group)  # chunk i: rank i's columns of my tokens
        n, width = local_PNS.shape[0] // size, local_PNS.shape[1]
        return received.view(size, n, width).permute(1, 0, 2).reshape(n, size * width)

    @staticmethod
    def backward(ctx, grad_NV: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        size, _ = _group_size_rank(ctx.group)
        n = grad_NV.shape[0]
        send = grad_NV.reshape(n, size, -1).permute(1, 0, 2).contiguous().view(size * n, -1)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=ctx.group)  # chunk i: rank i's tokens, my columns
        return received, None


def colwise_bag(weight_RS: Tensor, rows_NL: Tensor, weights_NL: Tensor, sharding: ColumnSharding, backend: Backend) -> Tensor:
    """[N, V] weighted bag of this rank's tokens over a column-sharded table (see module docstring)."""
    group = sharding.shard_group
    size, _ = _group_size_rank(group)
    rows_PNL = rows_NL.new_empty((size * rows_NL.shape[0],) + tuple(rows_NL.shape[1:]))
    dist.all_gather_into_tensor(rows_PNL, rows_NL.contiguous(), group=group)
    weights_PNL = _AllGatherScores.apply(weights_NL, group)
    return _ExchangeColumns.apply(weighted_embedding_bag(weight_RS, rows_PNL, weights_PNL, backend), group)


def shard_columns(table: nn.Module, mesh: DeviceMesh, divisor: int) -> None:
    """Keep this rank's column slice of `table.weight` [R, V] (mesh: 2-D, ("replicate", "shard"));
    `divisor`: the number of data-parallel ranks (gradients are averaged over all of them)."""
    size, rank = mesh.size(1), mesh.get_local_rank(1)
    full = table.weight
    if full.shape[1] % size != 0:
        raise ConfigError(
            f"the value table is {full.shape[1]} wide, not divisible by distributed.memory_parallel_size={size}: "
            "change mem_v_dim or memory_parallel_size"
        )
    width = full.shape[1] // size
    local = nn.Parameter(full.detach()[:, rank * width : (rank + 1) * width].clone(), requires_grad=full.requires_grad)
    local.column_sharding = ColumnSharding(mesh, divisor)  # type: ignore[attr-defined]
    table.weight = local
