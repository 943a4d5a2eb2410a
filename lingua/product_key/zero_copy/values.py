"""`ZeroCopyValues`: a product-key value table living in host memory, read and updated by the
compute device directly.

The table (fp32 master, plus a bf16 copy when `zero_copy_transfer=bf16` halves the bytes read)
and its optimizer state are host tensors from `HostMemory`; they never move, whatever `.to()`,
`.cuda()` or `to_empty()` the model goes through (the module materializes them on its first
`_apply` and ignores later ones). A forward:
  1. dedups the N*L looked-up rows on the compute device (sort + scan; no host sync: the buffer
     has min(N*L, R) slots, the most unique rows there can be, so its size is known without
     counting them; the U unique rows come first, empty slots hold row -1),
  2. gathers the unique rows from host memory into a device buffer (`kernels.gather_rows`: a
     Triton kernel over UVA on CUDA, torch indexing on CPU),
  3. runs the weighted bag (`weighted_embedding_bag`) on the buffer with remapped indices.
The buffer is kept for the bag's backward: [min(N*L, R), V] in the master dtype. Its backward leaves a row-sparse gradient (unique table rows, their summed gradients) on the
compute device in `weight.host_rows.grad`: the optimizer (lingua.optim.AdamW) clips, reduces
across data-parallel ranks and applies it to the touched rows only, reading and writing the host
rows through `HostRows`. Memory on the compute device scales with the tokens (bounded by the table's
rows), never with the table's width times the lookups.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from lingua.optim import RowStep
from lingua.product_key.embedding_bag import Backend, weighted_embedding_bag
from lingua.product_key.zero_copy.host import HostMemory, check_host_capacity
from lingua.product_key.zero_copy.kernels import gather_rows, scatter_rows, update_rows

logger = logging.getLogger(__name__)

TransferDtype = Literal["fp32", "bf16"]
UpdatePlace = Literal["device", "host"]


def dedup_rows(rows_P: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """(slot_rows [S], inverse [P]) of flat row ids in [0, n_rows), with no host sync.

    S = min(P, n_rows), a bound on the unique rows U known without counting them. slot_rows holds
    the sorted unique rows in its first U slots and -1 after them; inverse maps each lookup to its
    slot: slot_rows[inverse] == rows_P."""
    sorted_rows, order = torch.sort(rows_P)
    is_new = torch.ones_like(sorted_rows, dtype=torch.bool)
    is_new[1:] = sorted_rows[1:] != sorted_rows[:-1]
    slot_of_sorted = torch.cumsum(is_new, 0) - 1
    inverse = torch.empty_like(rows_P).scatter_(0, order, slot_of_sorted)
    slot_rows = rows_P.new_full((min(rows_P.numel(), n_rows),), -1)
    slot_rows.scatter_(0, slot_of_sorted, sorted_rows)  # slot ids < U <= S; duplicates write equal values
    return slot_rows, inverse


class HostRows:
    """Row access to one table's host tensors from where its gradient lives, and that gradient.

    Attached to the table's Parameter as `param.host_rows` (the parameter itself stays in host
    memory, so autograd cannot hold its device gradient in `.grad`). `update_on`: "device" does
    the optimizer math on the compute device, reading and writing host rows over UVA; "host" moves
    the gradient rows to the CPU and updates there with torch's threads.
    """

    def __init__(self, memory: HostMemory, weight: Tensor, low_precision: Tensor | None, update_on: UpdatePlace) -> None:
        self.memory = memory
        self.weight = weight
        self.low_precision = low_precision
        self.update_on = update_on
        self.grad: Tensor | None = None  # sparse COO [R, V] on the compute device

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Optimizer state in host memory (shared by the node's ranks)."""
        return self.memory.zeros(shape, dtype)

    def accumulate(self, grad: Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad + grad

    def prepare(self, rows_U: Tensor, grads_U: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of a step's (sorted unique rows, gradients), on the update device."""
        owned = self.memory.owned(torch.arange(rows_U.numel(), device=rows_U.device))
        rows_U, grads_U = rows_U[owned], grads_U[owned]
        if self.update_on == "host":
            rows_U, grads_U = rows_U.cpu(), grads_U.cpu()
        return rows_U, grads_U

    def read(self, tensor: Tensor, rows_U: Tensor) -> Tensor:
        """tensor[rows] ([R] or [R, D] host tensor) onto rows' device, in the tensor's dtype."""
        table = tensor.view(tensor.shape[0], -1)
        return gather_rows(table, rows_U, tensor.dtype).view((rows_U.numel(),) + tuple(tensor.shape[1:]))

    def write(self, tensor: Tensor, rows_U: Tensor, values: Tensor) -> None:
        """tensor[rows] = values ([R] or [R, D] host tensor: per-row optimizer state; the weight's rows
        change through `update`, which also refreshes its low-precision copy)."""
        table = tensor.view(tensor.shape[0], -1)
        scatter_rows(table, rows_U, values.reshape(rows_U.numel(), -1))

    def update(self, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> None:
        """One optimizer step of the weight's rows (and its moments, when given) where they live,
        from the update device: on CUDA one kernel reads and writes each row once over UVA."""
        table = self.weight.view(self.weight.shape[0], -1)
        moments = (moments[0].view(table.shape), moments[1].view(table.shape)) if moments else None
        update_rows(table, self.low_precision, moments, step)

    def sync(self) -> None:
        """Wait until every rank of the node finished writing its rows (before the next read)."""
        self.memory.barrier()


class _GatherHostRows(torch.autograd.Function):
    """buffer [S, V] = table rows of slot_rows (zeros for -1 slots), on slot_rows' device; the
    backward turns the buffer's sparse gradient into table rows and stores it in host_rows."""

    @staticmethod
    def forward(ctx, weight: Tensor, slot_rows: Tensor, host: HostRows) -> Tensor:  # type: ignore[override]
        ctx.host = host
        ctx.save_for_backward(slot_rows)
        source = host.low_precision if host.low_precision is not None else weight
        return gather_rows(source, slot_rows, weight.dtype)

    @staticmethod
    def backward(ctx, grad_buffer: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        (slot_rows,) = ctx.saved_tensors
        if grad_buffer.is_sparse:
            grad_buffer = grad_buffer.coalesce()
            slots, values = grad_buffer.indices()[0], grad_buffer.values()
        else:
            slots = torch.arange(grad_buffer.shape[0], device=grad_buffer.device)[slot_rows >= 0]
            values = grad_buffer[slots]
        rows = slot_rows[slots]  # slots are sorted, and so are their rows (sorted unique)
        shape = tuple(ctx.host.weight.shape)
        ctx.host.accumulate(torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False))
        return None, None, None


class ZeroCopyValues(nn.Module):
    """The value table `weight` [R, V] in host memory (see module docstring); a drop-in for
    `MemoryValues` (same `weight` name in state dicts, same optimizer tags) without PEER inputs."""

    peer_in = None

    def __init__(
        self, n_rows: int, v_dim: int, lr: float | None, weight_decay: float | None, update: str, lr_schedule: bool,
        transfer: TransferDtype = "fp32", update_on: UpdatePlace = "device", dtype: torch.dtype = torch.float32,
    ) -> None:
        """dtype: of the master table (fp32; fp64 for gradchecks)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, v_dim, device="meta", dtype=dtype))  # no memory until materialized
        self.lr, self.weight_decay, self.update, self.lr_schedule = lr, weight_decay, update, lr_schedule
        self.transfer = transfer
        self.update_on = update_on
        self.host: HostRows | None = None

    def materialize(self, share_with_node: bool = False) -> None:
        """Allocate the host table (and its bf16 copy) once; later calls do nothing.
        share_with_node: one table per node for the ranks of a training job (collective, see HostMemory)."""
        if self.host is not None:
            return
        shape, dtype = tuple(self.weight.shape), self.weight.dtype
        low_bytes = self.weight.numel() * 2 if self.transfer == "bf16" else 0
        check_host_capacity(self.weight.numel() * self.weight.element_size() + low_bytes, f"the zero-copy value table {shape[0]} x {shape[1]}")
        memory = HostMemory(share_with_node)
        weight = nn.Parameter(memory.zeros(shape, dtype), requires_grad=self.weight.requires_grad)
        low = memory.zeros(shape, torch.bfloat16) if self.transfer == "bf16" else None
        self.host = HostRows(memory, weight, low, self.update_on)
        weight.host_rows = self.host  # type: ignore[attr-defined]
        self.weight = weight
        logger.info(
            "value table %d x %d in host memory (%s%s), shared by %d rank(s) of this node",
            shape[0], shape[1], "page-locked" if memory.pin else "pageable", ", bf16 copy" if low is not None else "", memory.local_size,
        )

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Device and dtype moves leave the table where it is; the first one materializes it
        (private memory: a training job materializes first, sharing it per node)."""
        self.materialize()
        return self

    def init_weights(self) -> None:
        """N(0, 1/V) rows, filled in parallel on the host, seeded from torch's default generator."""
        self.materialize()
        assert self.host is not None
        seed = int(torch.randint(0, 2**62, (1,)).item())
        self.host.memory.fill_normal_(self.weight.data, self.weight.shape[1] ** -0.5, seed)
        self.refresh_low_precision()

    def refresh_low_precision(self) -> None:
        """Recompute the bf16 copy from the master (after init or a checkpoint load)."""
        assert self.host is not None
        if self.host.low_precision is not None:
            if self.host.memory.local_rank == 0:
                self.host.low_precision.copy_(self.weight.data)
            self.host.memory.barrier()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        self.materialize()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_low_precision()

    @torch.compiler.disable
    def bag(self, rows_NL: Tensor, weights_NL: Tensor, backend: Backend) -> Tensor:
        """[N, V] weighted bag of the table's rows (see module docstring), on rows' device."""
        self.materialize()
        assert self.host is not None
        slot_rows, inverse = dedup_rows(rows_NL.reshape(-1), self.weight.shape[0])
        buffer = _GatherHostRows.apply(self.weight, slot_rows, self.host)
        return weighted_embedding_bag(buffer, inverse.view(rows_NL.shape), weights_NL, backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} x {self.weight.shape[1]} in host memory, transfer {self.transfer}, update on {self.update_on}"
