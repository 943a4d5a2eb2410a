"""Product-key memory layers: `ProductKeyArgs` (the `model.productkey_args` config), the value
table `MemoryValues`, the layer `HashingMemory`, and what the training loop needs from them
(param groups for the values, FLOPs of the retrieved rows, usage metrics).

A memory layer replaces the FFN of chosen blocks. Per token x: query q = W_q x (+b), per head split
into halves scored against n_keys sub-keys each; top-knn per half, knn^2 candidate sums, top-knn
again (= exact top-knn over the n_keys^2 product keys); softmax per head; the heads' (row, weight)
pairs form one bag over the value table. Memory+: value_proj(bag * silu(W_s x)). Optional gating
sigmoid(W_g x) * out. PEER: each retrieved row is a single-neuron expert (gelu(<x, u>) * v).
Sharing: the model owns ONE `MemoryValues` and hands it to every layer (kept as a plain reference,
not a submodule), so state dicts, optimizers and FSDP see the table once.
Shapes: N tokens, E model dim, H heads, C key dim, M n_keys, J knn, V value dim, R = M^2 rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lingua.args import ConfigError
from lingua.optim import ParamGroupSpec, RowUpdate
from lingua.precision import accumulation_dtype
from lingua.product_key.colwise_embeddingbag import colwise_bag, shard_columns
from lingua.product_key.embedding_bag import Backend, weighted_embedding_bag
from lingua.product_key.zero_copy import TransferDtype, UpdatePlace, ZeroCopyValues


@dataclass
class ProductKeyArgs:
    RANGES: ClassVar[dict[str, str]] = {
        "mem_n_keys": ">= 1", "mem_heads": ">= 1", "mem_knn": ">= 1", "mem_k_dim": ">= 2", "mem_v_dim": ">= 1 or -1", "value_fixed_lr": "> 0",
        "mem_input_dropout": "[0, 1)", "mem_query_dropout": "[0, 1)", "mem_value_dropout": "[0, 1)", "value_weight_decay": ">= 0",
        "zero_copy_buffer_margin": ">= 1", "zero_copy_first_buffer_rows": ">= 0",
    }

    is_enabled: bool = False  # replace the FFN of `layers` by product-key memory layers
    layers: str = ""  # comma-separated block ids whose FFN becomes a memory layer, e.g. "4,12,20"
    mem_n_keys: int = 1024  # sub-keys per half; the value table has mem_n_keys**2 rows
    mem_heads: int = 4  # read heads; their bags are summed
    mem_knn: int = 32  # rows read per head
    mem_share_values: bool = True  # one value table for all memory layers (else one per layer)
    mem_k_dim: int = 512  # query / key width (even: each half scores against its own sub-keys)
    mem_v_dim: int = -1  # value width; -1: model dim
    swilu_projection: bool = True  # Memory+ output: value_proj(bag * silu(W_s x))
    value_fixed_lr: float | None = 0.001  # lr of the value table; null: the base optim.lr
    mem_gated: bool = False  # scale the output by sigmoid(W_g x)
    peer_variant: bool = False  # PEER: retrieved single-neuron experts (needs mem_v_dim=-1)
    mem_input_dropout: float = 0.0  # dropout on the layer input
    mem_query_dropout: float = 0.0  # dropout on the query
    mem_value_dropout: float = 0.0  # dropout on the layer output
    mem_query_batchnorm: bool = False  # BatchNorm1d on the query (statistics over the batch's tokens)
    mem_query_bias: bool = True  # bias of the query projection
    value_update: RowUpdate = "lazy"  # lazy: Adam on the rows read this step; dense: every row (paper); rowwise_adagrad: one accumulator per row
    value_weight_decay: float | None = 0.0  # decoupled weight decay of the values; null: optim.weight_decay (as the public code)
    value_lr_schedule: bool = True  # the value lr follows warmup/decay, as in the public code; false: constant
    bag_backend: Backend = "auto"  # weighted bag: auto (Triton on CUDA, torch on CPU) | triton | torch
    zero_copy: bool = False  # keep the value table and its optimizer state in host memory, read by the GPU directly
    zero_copy_transfer: TransferDtype = "fp32"  # rows the GPU reads: fp32 master, or a bf16 copy (half the bytes)
    zero_copy_update: UpdatePlace = "device"  # value update: on the GPU writing host rows over UVA, or on host CPU threads
    zero_copy_buffer_margin: float = 1.25  # forward buffer rows: this x the recent unique rows (more are read from host memory)
    zero_copy_first_buffer_rows: int = 0  # forward buffer rows before any unique-row count is known; 0: min(tokens x lookups, rows)
    mem_offload: bool = False  # values on an FPGA memory device: not supported (the public code's XDMA path)

    def __post_init__(self) -> None:
        key = "model.productkey_args"
        if self.mem_knn > self.mem_n_keys:
            raise ConfigError(f"{key}.mem_knn={self.mem_knn} exceeds mem_n_keys={self.mem_n_keys}: lower mem_knn")
        if self.mem_k_dim % 2 != 0:
            raise ConfigError(f"{key}.mem_k_dim={self.mem_k_dim} must be even (two halves of product keys)")
        if self.peer_variant and self.mem_v_dim != -1:
            raise ConfigError(f"{key}.peer_variant=true needs mem_v_dim=-1 (experts output the model dim)")
        if self.is_enabled and not self.layer_ids:
            raise ConfigError(f"{key}.is_enabled=true needs layers, e.g. layers=\"4,12,20\"")
        if self.mem_offload:
            raise ConfigError(
                f"{key}.mem_offload=true (values on an FPGA memory device) is not supported; "
                f"use {key}.zero_copy=true to keep the values in host memory"
            )
        if self.zero_copy and self.peer_variant:
            raise ConfigError(f"{key}.zero_copy=true does not support peer_variant=true (experts' input rows stay on the GPU)")
        if self.zero_copy and self.value_update == "dense":
            raise ConfigError(
                f"{key}.zero_copy=true needs value_update=lazy or rowwise_adagrad: dense updates rewrite every host row each step"
            )

    def host_bytes(self, dim: int, training: bool) -> int:
        """Host memory a zero-copy run holds for its value tables (0 without zero_copy): fp32
        weights, the bf16 copy, and when training the optimizer state (Adam: two moments and a
        per-row step; rowwise Adagrad: one accumulator per row)."""
        if not (self.is_enabled and self.zero_copy):
            return 0
        rows, width = self.mem_n_keys**2, self.value_dim(dim)
        per_table = rows * width * (4 + (2 if self.zero_copy_transfer == "bf16" else 0))
        if training:
            per_table += rows * 4 + (rows * width * 8 if self.value_update == "lazy" else 0)
        return per_table * (1 if self.mem_share_values else len(self.layer_ids))

    @property
    def layer_ids(self) -> list[int]:
        """The memory layers' block ids, in order."""
        try:
            ids = [int(part) for part in self.layers.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"model.productkey_args.layers={self.layers!r}: give comma-separated integers, e.g. \"4,12,20\"") from None
        if len(set(ids)) != len(ids):
            raise ConfigError(f"model.productkey_args.layers={self.layers!r} lists a layer twice")
        return ids

    def check_layers(self, n_layers: int) -> None:
        """Raise unless every memory layer id is a block of an n_layers model."""
        if not self.is_enabled:
            return
        bad = [i for i in self.layer_ids if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(
                f"model.productkey_args.layers={self.layers!r}: ids {bad} are outside the {n_layers} blocks "
                f"(valid: 0..{n_layers - 1})"
            )

    def value_dim(self, dim: int) -> int:
        return self.mem_v_dim if self.mem_v_dim > 0 else dim


class MemoryValues(nn.Module):
    """The value table `weight` [R, V] (and, for PEER, the experts' input rows `peer_in` [R, E]).

    Its gradients are row-sparse; `optim_group` says how the optimizer must treat it (tagged at
    construction, so a model loaded from weights keeps its value lr and update rule).
    """

    def __init__(self, n_rows: int, v_dim: int, args: ProductKeyArgs, peer_in_dim: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, v_dim))
        self.peer_in = nn.Parameter(torch.empty(n_rows, peer_in_dim)) if peer_in_dim else None
        self.lr = args.value_fixed_lr
        self.weight_decay = args.value_weight_decay
        self.update: RowUpdate = args.value_update
        self.lr_schedule = args.value_lr_schedule
        self._register_state_dict_hook(_whole_table_state)
        self._register_load_state_dict_pre_hook(_local_slice_state, with_module=True)

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.weight.shape[1] ** -0.5)
        if self.peer_in is not None:
            nn.init.normal_(self.peer_in, mean=0.0, std=self.peer_in.shape[1] ** -0.5)

    def bag(self, rows_NL: Tensor, weights_NL: Tensor, backend: Backend) -> Tensor:
        """[N, V] weighted bag of the table's rows (over the memory-parallel group when sharded)."""
        sharding = getattr(self.weight, "column_sharding", None)
        if sharding is not None:
            return colwise_bag(self.weight, rows_NL, weights_NL, sharding, backend)
        return weighted_embedding_bag(self.weight, rows_NL, weights_NL, backend)


def _whole_table_state(module: MemoryValues, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A column-sharded table appears in state dicts whole (a DTensor over the local slice)."""
    sharding = getattr(module.weight, "column_sharding", None)
    if sharding is not None:
        state_dict[prefix + "weight"] = sharding.global_view(state_dict[prefix + "weight"])


def _local_slice_state(module: MemoryValues, state_dict: dict, prefix: str, *args: object) -> None:
    """Loading into a column-sharded table: keep this rank's columns of a whole table."""
    sharding = getattr(module.weight, "column_sharding", None)
    key = prefix + "weight"
    if sharding is None or key not in state_dict:
        return
    value = state_dict[key]
    if isinstance(value, DTensor):
        value = value.to_local() if value.placements == sharding.placements else value.full_tensor()
    if value.shape[1] != module.weight.shape[1]:  # a whole table (another layout, a consolidated file)
        width, rank = module.weight.shape[1], sharding.mesh.get_local_rank(1)
        value = value[:, rank * width : (rank + 1) * width]
    state_dict[key] = value


ValueTable = MemoryValues | ZeroCopyValues


def build_values(n_rows: int, v_dim: int, args: ProductKeyArgs, peer_in_dim: int | None = None) -> ValueTable:
    """The value table the config asks for: on the compute device, or in host memory (zero_copy)."""
    if args.zero_copy:
        return ZeroCopyValues(
            n_rows, v_dim, args.value_fixed_lr, args.value_weight_decay, args.value_update, args.value_lr_schedule,
            args.zero_copy_transfer, args.zero_copy_update,
            buffer_margin=args.zero_copy_buffer_margin, first_buffer_rows=args.zero_copy_first_buffer_rows,
        )
    return MemoryValues(n_rows, v_dim, args, peer_in_dim)


def product_key_topk(query_NHC: Tensor, keys_H2MC: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Top-knn of the M^2 product keys per token and head: (scores [N, H, J] descending, rows [N, H, J]).

    query [N, H, C]; keys [H, 2, M, C/2] (two sub-key sets per head). Row i1 * M + i2 scores
    <q1, k1[i1]> + <q2, k2[i2]>; the best knn pairs always lie among each half's own top-knn, so
    searching the knn^2 candidate pairs is exact.
    """
    half = query_NHC.shape[-1] // 2
    n_keys = keys_H2MC.shape[2]
    scores1_NHM = torch.einsum("nhc,hmc->nhm", query_NHC[..., :half], keys_H2MC[:, 0])
    scores2_NHM = torch.einsum("nhc,hmc->nhm", query_NHC[..., half:], keys_H2MC[:, 1])
    top1, idx1 = scores1_NHM.topk(knn, dim=-1)
    top2, idx2 = scores2_NHM.topk(knn, dim=-1)
    cand_scores_NHJJ = top1.unsqueeze(-1) + top2.unsqueeze(-2)
    cand_rows_NHJJ = idx1.unsqueeze(-1) * n_keys + idx2.unsqueeze(-2)
    scores_NHJ, best = cand_scores_NHJJ.flatten(-2).topk(knn, dim=-1)
    return scores_NHJ, cand_rows_NHJJ.flatten(-2).gather(-1, best)


class HashingMemory(nn.Module):
    """A product-key memory layer mapping [..., E] -> [..., E] (a drop-in FFN replacement).

    values: the shared table (kept as a plain reference; its owner registers and initializes it),
    or None to own a table of its own (`self.values`).
    """

    def __init__(self, dim: int, args: ProductKeyArgs, layer_id: int, values: ValueTable | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.layer_id = layer_id
        self.heads, self.knn, self.k_dim, self.n_keys = args.mem_heads, args.mem_knn, args.mem_k_dim, args.mem_n_keys
        self.v_dim = args.value_dim(dim)
        self.n_rows = args.mem_n_keys**2
        self.peer = args.peer_variant
        self.bag_backend: Backend = args.bag_backend
        self.input_dropout, self.query_dropout, self.value_dropout = (
            args.mem_input_dropout, args.mem_query_dropout, args.mem_value_dropout
        )
        self.keys = nn.Parameter(torch.empty(2 * self.heads * self.n_keys, self.k_dim // 2))
        self.query_proj = nn.Linear(dim, self.heads * self.k_dim, bias=args.mem_query_bias)
        self.query_norm = nn.BatchNorm1d(self.heads * self.k_dim) if args.mem_query_batchnorm else None
        use_swilu = args.swilu_projection and not self.peer
        self.swilu_projection = nn.Linear(dim, self.v_dim) if use_swilu else None
        self.value_proj = nn.Linear(self.v_dim, dim) if (use_swilu or args.mem_v_dim > 0) and not self.peer else None
        self.gating = nn.Linear(dim, 1) if args.mem_gated else None
        if values is None:
            self.values: ValueTable | None = build_values(self.n_rows, self.v_dim, args, dim if self.peer else None)
            self._shared_values = None
        else:
            expected = (self.n_rows, self.v_dim)
            if tuple(values.weight.shape) != expected or (values.peer_in is not None) != self.peer:
                raise ValueError(f"layer {layer_id}: the shared table is {tuple(values.weight.shape)}, expected {expected}")
            self.values = None
            object.__setattr__(self, "_shared_values", values)  # a reference, not a submodule
        # Usage counters since the last read (not saved): lookups per row, [forwards, unique rows].
        # Zero-copy tables skip the per-row counts (device memory must not grow with the table).
        self.register_buffer("usage_hits", torch.zeros(0 if args.zero_copy else self.n_rows), persistent=False)
        self.register_buffer("usage_counts", torch.zeros(2), persistent=False)

    @property
    def table(self) -> ValueTable:
        return self.values if self.values is not None else self._shared_values  # type: ignore[return-value]

    @property
    def owns_table(self) -> bool:
        return self.values is not None

    def init_weights(self) -> None:
        """Every parameter and buffer of the layer (and of its table when it owns one)."""
        bound = 1 / math.sqrt(self.k_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.xavier_uniform_(self.query_proj.weight)
        for linear in (self.swilu_projection, self.value_proj, self.gating):
            if linear is not None:
                nn.init.normal_(linear.weight, mean=0.0, std=self.dim**-0.5)
        for linear in (self.query_proj, self.swilu_projection, self.value_proj, self.gating):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.query_norm is not None:
            self.query_norm.reset_running_stats()
            self.query_norm.reset_parameters()
        if self.values is not None:
            self.values.init_weights()
        self.usage_hits.zero_()
        self.usage_counts.zero_()

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        x_NE = F.dropout(x.reshape(-1, self.dim), self.input_dropout, self.training)
        n_tokens = x_NE.shape[0]
        query = self.query_proj(x_NE)
        if self.query_norm is not None:
            query = self.query_norm(query)
        query_NHC = F.dropout(query, self.query_dropout, self.training).view(n_tokens, self.heads, self.k_dim)
        keys_H2MC = self.keys.view(self.heads, 2, self.n_keys, self.k_dim // 2)
        scores_NHJ, rows_NHJ = product_key_topk(query_NHC, keys_H2MC.to(query_NHC.dtype), self.knn)
        self._count_usage(rows_NHJ)
        # Softmax in fp32 at least (bf16 scores under autocast); heads' bags concatenated: L = H * J.
        weights_NL = F.softmax(scores_NHJ.to(accumulation_dtype(scores_NHJ.dtype)), dim=-1).flatten(1)
        rows_NL = rows_NHJ.flatten(1)
        table = self.table
        if self.peer:
            # Expert j: gelu(<x, u_j>) * softmax score, then its output row v_j.
            u_NLE = F.embedding(rows_NL, table.peer_in, sparse=True)
            act_NL = F.gelu(torch.einsum("ne,nle->nl", x_NE.to(u_NLE.dtype), u_NLE)) * weights_NL
            out = self.read_values(rows_NL, act_NL)
        else:
            out = self.read_values(rows_NL, weights_NL)
            if self.swilu_projection is not None:
                out = self.value_proj(out * F.silu(self.swilu_projection(x_NE)))
            elif self.value_proj is not None:
                out = self.value_proj(out)
        out = F.dropout(out, self.value_dropout, self.training)
        if self.gating is not None:
            out = torch.sigmoid(self.gating(x_NE)) * out
        return out.view(*lead_shape, self.dim)

    def read_values(self, rows_NL: Tensor, weights_NL: Tensor) -> Tensor:
        """The weighted bag over this layer's table: [N, L] rows and weights -> [N, V].

        The one place the table is read: memory parallelism (the table sharded by columns over
        ranks) replaces this method to gather rows and weights over its group, read the local
        column slice and exchange the outputs.
        """
        return self.table.bag(rows_NL, weights_NL, self.bag_backend)

    @torch.no_grad()
    def _count_usage(self, rows_NHJ: Tensor) -> None:
        """Device-side counters only (no host sync): lookups per row and unique rows per forward."""
        if self.usage_hits.numel() == 0:  # zero-copy: unique rows only, from a sort of the lookups
            sorted_rows = rows_NHJ.flatten().sort().values
            unique = (sorted_rows[1:] != sorted_rows[:-1]).sum() + min(sorted_rows.numel(), 1)
            self.usage_counts += torch.stack((torch.ones_like(self.usage_counts[0]), unique.to(self.usage_counts.dtype)))
            return
        hits = torch.zeros_like(self.usage_hits).index_add_(
            0, rows_NHJ.flatten(), torch.ones(rows_NHJ.numel(), device=rows_NHJ.device, dtype=self.usage_hits.dtype)
        )
        self.usage_hits += hits
        self.usage_counts += torch.stack((torch.ones_like(self.usage_counts[0]), (hits > 0).sum().to(hits.dtype)))


# ---------------------------------------------------------------------------------------------
# What a model with memory layers tells the training loop.


def memory_layers(model: nn.Module) -> list[HashingMemory]:
    return [m for m in model.modules() if isinstance(m, HashingMemory)]


def value_tables(model: nn.Module) -> list[ValueTable]:
    """Each distinct value table once (shared tables are reached through their layers)."""
    tables: dict[int, ValueTable] = {}
    for layer in memory_layers(model):
        tables.setdefault(id(layer.table), layer.table)
    for module in model.modules():
        if isinstance(module, (MemoryValues, ZeroCopyValues)):
            tables.setdefault(id(module), module)
    return list(tables.values())


def memory_param_groups(model: nn.Module) -> list[ParamGroupSpec]:
    """One "memory_values" group per distinct (lr, decay, update, schedule) of the value tables."""
    groups: dict[tuple, ParamGroupSpec] = {}
    for table in value_tables(model):
        key = (table.lr, table.weight_decay, table.update, table.lr_schedule)
        if key not in groups:
            name = "memory_values" if not groups else f"memory_values_{len(groups)}"
            groups[key] = ParamGroupSpec(
                name, [], lr=table.lr, weight_decay=table.weight_decay, follow_schedule=table.lr_schedule, row_update=table.update
            )
        groups[key].params.extend(p for p in table.parameters() if p.requires_grad)
    return list(groups.values())


def value_param_count(model: nn.Module) -> int:
    return sum(p.numel() for table in value_tables(model) for p in table.parameters())


def memory_flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token of the retrieved rows: each memory layer reads heads*knn rows of
    v_dim (plus E for PEER's input rows); one multiply-add each forward, two backward (score and
    value gradients): 6 FLOPs per retrieved element. Query and key scoring are dense parameters
    (keys: heads * n_keys * k_dim multiply-adds per token) and are counted with them."""
    total = 0.0
    for layer in memory_layers(model):
        row_width = layer.v_dim + (layer.dim if layer.peer else 0)
        total += 6.0 * layer.heads * layer.knn * row_width
    return total


@torch.no_grad()
def log_metrics(model: nn.Module) -> dict[str, float]:
    """Usage of each memory layer since the last call (then reset): fraction of rows read
    (`rows_touched`), mean unique rows per forward, share of lookups that hit the hottest 1% of
    rows; per table, the fraction of rows any layer read (rows the lazy optimizer updated)."""
    metrics: dict[str, float] = {}
    table_hits: dict[int, Tensor] = {}
    for layer in memory_layers(model):
        forwards, unique_rows = layer.usage_counts.tolist()
        if forwards == 0:
            continue
        prefix = f"memory/layer{layer.layer_id}"
        metrics[f"{prefix}/rows_per_forward"] = unique_rows / forwards
        layer.usage_counts.zero_()
        hits = layer.usage_hits
        if hits.numel() == 0:
            continue
        hottest = max(1, layer.n_rows // 100)
        metrics[f"{prefix}/rows_touched"] = (hits > 0).float().mean().item()
        metrics[f"{prefix}/hot1pct_share"] = (hits.topk(hottest).values.sum() / hits.sum().clamp_min(1)).item()
        key = id(layer.table)
        table_hits[key] = table_hits[key] + hits if key in table_hits else hits.clone()
        layer.usage_hits.zero_()
    for index, hits in enumerate(table_hits.values()):
        name = "memory/values" if len(table_hits) == 1 else f"memory/values{index}"
        metrics[f"{name}/rows_touched"] = (hits > 0).float().mean().item()
    return metrics


def shard_value_tables(model: nn.Module, mesh: DeviceMesh, divisor: int) -> None:
    """Memory parallelism: every value table keeps this rank's column slice (see
    colwise_embeddingbag); mesh: 2-D ("replicate", "shard"), divisor: the data-parallel size."""
    for table in value_tables(model):
        if isinstance(table, ZeroCopyValues):
            raise ConfigError(
                "distributed.memory_parallel_size > 1 with model.productkey_args.zero_copy=true: zero-copy tables are "
                "shared per node in host memory; set memory_parallel_size=1"
            )
        shard_columns(table, mesh, divisor)


def build_memory_layers(args: ProductKeyArgs, dim: int) -> tuple[dict[int, HashingMemory], ValueTable | None]:
    """The memory layers by block id, and the shared table (None when each layer owns its own).
    The caller registers the shared table once on its model and initializes it in init_weights."""
    if not args.is_enabled:
        return {}, None
    shared = None
    if args.mem_share_values:
        shared = build_values(args.mem_n_keys**2, args.value_dim(dim), args, dim if args.peer_variant else None)
    layers = {layer_id: HashingMemory(dim, args, layer_id, shared) for layer_id in args.layer_ids}
    return layers, shared


__all__ = [
    "HashingMemory", "MemoryValues", "ProductKeyArgs", "ValueTable", "ZeroCopyValues", "build_memory_layers", "build_values",
    "log_metrics", "memory_flops_per_token", "memory_layers", "memory_param_groups", "product_key_topk",
    "shard_value_tables", "value_param_count", "value_tables",
]
