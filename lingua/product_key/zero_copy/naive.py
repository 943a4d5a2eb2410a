"""Readable torch reference of the row transfers between a host table and the compute device.

    gather: out[s] = table[rows[s]] (zeros where rows[s] < 0), cast to out's dtype
    scatter: table[rows[u]] = values[u]
    update: one optimizer step of the rows (lazy Adam or rowwise Adagrad, `lingua.optim.update_rows_`)
            read from the table and its moments and written back, with the table's low-precision copy
    slot values: the rows a zero-copy bag reads per slot: buffer[s] for the C slots the device
            buffer holds, table[slot_rows[s]] for the overflow slots s >= C (the two-source bag of
            `embedding_bag.triton_bag` with an `Overflow` must equal the plain bag over these)

The Triton kernels in `kernels.py` must agree with these; CPU tables take these functions (the
CPU path of zero-copy values), the tests run the kernels on CPU through the Triton interpreter.
Shapes: S slots, R table rows, D row width, U rows written, C buffer rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lingua.optim import RowStep, update_rows_


def gather_rows(table_RD: Tensor, rows_S: Tensor, out_dtype: torch.dtype) -> Tensor:
    """[S, D] in out_dtype: the rows of `table` listed in rows_S; slots holding -1 give zeros."""
    valid_S = rows_S >= 0
    out = table_RD.index_select(0, rows_S.clamp(min=0)).to(out_dtype)
    return out.masked_fill_(~valid_S.unsqueeze(1), 0)


def scatter_rows(table_RD: Tensor, rows_U: Tensor, values_UD: Tensor) -> None:
    """table[rows] = values (rows unique)."""
    table_RD.index_copy_(0, rows_U, values_UD.to(table_RD.dtype))


def update_rows(table_RD: Tensor, low_precision_RD: Tensor | None, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> None:
    """The rows step.rows (unique) of the table, and of the moments (exp_avg, exp_avg_sq) when
    given, take one optimizer step (`update_rows_`); the low-precision copy's rows follow, rounded once."""
    p_rows = update_rows_(table_RD, moments, step)
    if low_precision_RD is not None:
        low_precision_RD.index_copy_(0, step.rows, p_rows.to(low_precision_RD.dtype))


def slot_values(buffer_CD: Tensor, table_RD: Tensor, slot_rows_S: Tensor, n_slots: int) -> Tensor:
    """[n_slots, D] in the buffer's dtype: the buffer's C rows, then the table rows of slots
    C..n_slots-1 (the overflow slots; -1 slots give zeros)."""
    overflow = gather_rows(table_RD, slot_rows_S[buffer_CD.shape[0] : n_slots], buffer_CD.dtype)
    return torch.cat([buffer_CD, overflow])
