"""`ZeroCopyValues`: a product-key value table living in host memory, read and updated by the
compute device directly.

The table (fp32 master, plus a bf16 copy when `zero_copy_transfer=bf16` halves the bytes read)
and its optimizer state are host tensors from `HostMemory`; they never move, whatever `.to()`,
`.cuda()` or `to_empty()` the model goes through (the module materializes them on its first
`_apply` and ignores later ones). A forward:
  1. dedups the N*L looked-up rows on the compute device (sort + scan, no host sync): each lookup
     gets the slot of its row, the U unique rows taking slots 0..U-1 in row order; U stays on the
     device,
  2. gathers the rows of the first C slots from host memory into a [C, V] device buffer
     (`kernels.gather_rows`: a Triton kernel over UVA on CUDA, torch indexing on CPU). The capacity
     C (`capacity.BufferCapacity`) follows the unique-row counts of earlier calls, read back
     without a sync: about margin x U, never more than min(N*L, R),
  3. runs the weighted bag on the buffer; lookups of the overflow slots (>= C, when U > C) read
     their rows from the host table instead (the two-source bag of `embedding_bag.triton_bag`; on
     the torch backend the overflow rows are gathered beside the buffer), so the result is exact
     for any U, and the overflow is counted, warned about and covered by the next capacity.
The buffer is kept for the bag's backward, which reads value rows for the score gradient from the
same two sources. The backward leaves a row-sparse gradient (unique table rows, their summed gradients) on the
compute device in `weight.host_rows.grad`: the optimizer (lingua.optim.AdamW) clips, reduces
across data-parallel ranks and applies it to the touched rows only, reading and writing the host
rows through `HostRows`. Memory on the compute device scales with the unique rows a step reads,
never with the table's size nor with the lookups.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lingua.optim import RowStep
from lingua.product_key.embedding_bag import Backend, triton_bag
from lingua.product_key.zero_copy import naive
from lingua.product_key.zero_copy.capacity import BufferCapacity
from lingua.product_key.zero_copy.host import HostMemory, check_host_capacity
from lingua.product_key.zero_copy.kernels import HostPointer, gather_rows, scatter_rows, update_rows

logger = logging.getLogger(__name__)

TransferDtype = Literal["fp32", "bf16"]
UpdatePlace = Literal["device", "host"]


class Dedup(NamedTuple):
    """The unique rows of a bag's lookups, on the compute device."""

    slot_rows: Tensor  # [S] S = min(P, R): sorted unique rows in slots 0..U-1, -1 after them
    inverse: Tensor  # [P] each lookup's slot: slot_rows[inverse] == rows
    n_unique: Tensor  # [] int64 U, left on the device


def dedup_rows(rows_P: Tensor, n_rows: int) -> Dedup:
    """The unique rows of flat row ids in [0, n_rows), with no host sync: S = min(P, n_rows) slots
    bound U without counting them; U itself stays a device scalar."""
    sorted_rows, order = torch.sort(rows_P)
    is_new = torch.ones_like(sorted_rows, dtype=torch.bool)
    is_new[1:] = sorted_rows[1:] != sorted_rows[:-1]
    slot_of_sorted = torch.cumsum(is_new, 0) - 1
    inverse = torch.empty_like(rows_P).scatter_(0, order, slot_of_sorted)
    slot_rows = rows_P.new_full((min(rows_P.numel(), n_rows),), -1)
    slot_rows.scatter_(0, slot_of_sorted, sorted_rows)  # slot ids < U <= S; duplicates write equal values
    n_unique = slot_of_sorted[-1] + 1 if rows_P.numel() > 0 else rows_P.new_zeros(())
    return Dedup(slot_rows, inverse, n_unique.to(torch.int64))


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
        self.updates = 0  # optimizer steps taken (the forward buffer's capacity changes between them)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Optimizer state in host memory (shared by the node's ranks)."""
        return self.memory.zeros(shape, dtype)

    def accumulate(self, grad: Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad + grad

    def prepare(self, rows_U: Tensor, grads_U: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of a step's (sorted unique rows, gradients), on the update device."""
        owned = self.memory.owned_slots(torch.arange(rows_U.numel(), device=rows_U.device))
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
        self.updates += 1

    def sync(self) -> None:
        """Wait until every rank of the node finished writing its rows (before the next read)."""
        self.memory.barrier()


def _overflow(source_RV: Tensor, slot_rows_S: Tensor, capacity: int) -> triton_bag.Overflow | None:
    """The bag kernels' second source: slots >= capacity read the (host) table; None without overflow slots."""
    if capacity >= slot_rows_S.numel():
        return None
    table = HostPointer(source_RV) if slot_rows_S.is_cuda and not source_RV.is_cuda else source_RV
    return triton_bag.Overflow(table, source_RV.stride(0), slot_rows_S, capacity)


def _slot_values(buffer_CV: Tensor, source_RV: Tensor, slot_rows_S: Tensor, n_unique: Tensor) -> Tensor:
    """Torch backend: the buffer, then the overflow slots' rows read from the table (U is read:
    free on CPU; on CUDA this reference path syncs when the buffer can overflow)."""
    if buffer_CV.shape[0] >= slot_rows_S.numel():
        return buffer_CV
    n_slots = int(n_unique)
    return buffer_CV if n_slots <= buffer_CV.shape[0] else naive.slot_values(buffer_CV, source_RV, slot_rows_S, n_slots)


class _ZeroCopyBag(torch.autograd.Function):
    """out [N, V] = sum_l weights[n, l] * table[rows[n, l]], from a [C, V] device buffer of the first
    C unique rows and the host table for the rest (see module docstring). The backward returns the
    weights' gradient and leaves the table's row-sparse gradient in host_rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weights_NL: Tensor, weight: Tensor, slots_NL: Tensor, dedup: Dedup, capacity: int, host: HostRows, backend: Backend,
    ) -> Tensor:
        source = host.low_precision if host.low_precision is not None else weight
        buffer_CV = gather_rows(source, dedup.slot_rows[:capacity], weight.dtype)
        ctx.save_for_backward(buffer_CV, slots_NL, weights_NL, dedup.slot_rows, dedup.n_unique)
        ctx.host, ctx.source, ctx.backend = host, source, backend
        with torch.autocast(buffer_CV.device.type, enabled=False):
            if triton_bag.use_triton(buffer_CV, backend):
                return triton_bag._fwd(buffer_CV, slots_NL, weights_NL, _overflow(source, dedup.slot_rows, capacity))
            return triton_bag.torch_fwd(_slot_values(buffer_CV, source, dedup.slot_rows, dedup.n_unique), slots_NL, weights_NL)

    @staticmethod
    def backward(ctx, grad_out_NV: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:  # type: ignore[override]
        buffer_CV, slots_NL, weights_NL, slot_rows_S, n_unique = ctx.saved_tensors
        want_gw, want_gv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_gv or want_gw):
            return None, None, None, None, None, None, None
        grad_out_NV = grad_out_NV.contiguous()
        if triton_bag.use_triton(buffer_CV, ctx.backend):
            overflow = _overflow(ctx.source, slot_rows_S, buffer_CV.shape[0])
            slots_U, grad_rows_UV, grad_weights_NL = triton_bag._bwd(buffer_CV, slots_NL, weights_NL, grad_out_NV, want_gv, want_gw, overflow)
        else:
            values = _slot_values(buffer_CV, ctx.source, slot_rows_S, n_unique)
            slots_U, grad_rows_UV, grad_weights_NL = triton_bag.torch_bwd(values, slots_NL, weights_NL, grad_out_NV)
        if want_gv:  # slots are sorted unique, and so are their rows
            shape, dtype = tuple(ctx.host.weight.shape), buffer_CV.dtype
            rows = slot_rows_S[slots_U].unsqueeze(0)
            ctx.host.accumulate(torch.sparse_coo_tensor(rows, grad_rows_UV.to(dtype), shape, is_coalesced=True, check_invariants=False))
        grad_weights = grad_weights_NL.to(weights_NL.dtype) if want_gw else None
        return grad_weights, None, None, None, None, None, None


class ZeroCopyValues(nn.Module):
    """The value table `weight` [R, V] in host memory (see module docstring); a drop-in for
    `MemoryValues` (same `weight` name in state dicts, same optimizer tags) without PEER inputs."""

    peer_in = None

    def __init__(
        self, n_rows: int, v_dim: int, lr: float | None, weight_decay: float | None, update: str, lr_schedule: bool,
        transfer: TransferDtype = "fp32", update_on: UpdatePlace = "device", dtype: torch.dtype = torch.float32,
        buffer_margin: float = 1.25, first_buffer_rows: int = 0,
    ) -> None:
        """dtype: of the master table (fp32; fp64 for gradchecks). buffer_margin, first_buffer_rows:
        the forward buffer's capacity (see `capacity.BufferCapacity`)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, v_dim, device="meta", dtype=dtype))  # no memory until materialized
        self.lr, self.weight_decay, self.update, self.lr_schedule = lr, weight_decay, update, lr_schedule
        self.transfer = transfer
        self.update_on = update_on
        self.capacity = BufferCapacity(buffer_margin, first_buffer_rows)
        self.host: HostRows | None = None

    def materialize(self, share_with_node: bool = False) -> None:
        """Allocate the host table (and its bf16 copy) once; later calls do nothing.
        share_with_node: one table per node for the ranks of a training job (collective, see HostMemory)."""
        if self.host is not None:
            return
        shape, dtype = tuple(self.weight.shape), self.weight.dtype
        low_bytes = self.weight.numel() * 2 if self.transfer == "bf16" else 0
        memory = HostMemory(share_with_node)
        table_bytes = self.weight.numel() * self.weight.element_size() + low_bytes
        check_host_capacity(table_bytes, f"the zero-copy value table {shape[0]} x {shape[1]}", memory.local_size)
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
        """[N, V] weighted bag of the table's rows (see module docstring), on rows' device.
        rows [N, L] integer in [0, R), weights [N, L] floating."""
        self.materialize()
        assert self.host is not None
        if rows_NL.dim() != 2 or weights_NL.shape != rows_NL.shape:
            raise ValueError(f"expected rows [N, L] and weights [N, L], got {tuple(rows_NL.shape)} and {tuple(weights_NL.shape)}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={backend!r}: use 'auto', 'triton' or 'torch'")
        n_rows = self.weight.shape[0]
        dedup = dedup_rows(rows_NL.reshape(-1), n_rows)
        capacity = self.capacity.choose(rows_NL.numel(), n_rows, self.host.updates)
        if rows_NL.numel() > 0:
            self.capacity.record(dedup.n_unique, capacity)
        slots_NL = dedup.inverse.view(rows_NL.shape)
        return _ZeroCopyBag.apply(weights_NL.contiguous(), self.weight, slots_NL, dedup, capacity, self.host, backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} x {self.weight.shape[1]} in host memory, transfer {self.transfer}, update on {self.update_on}"
