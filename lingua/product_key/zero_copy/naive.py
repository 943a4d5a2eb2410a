"""Readable torch reference of the row transfers between a host table and the compute device.

    gather: out[s] = table[rows[s]] (zeros where rows[s] < 0), cast to out's dtype
    scatter: table[rows[u]] = values[u] (and the same rows of a low-precision copy, if any)
    update: one optimizer step of the rows (lazy Adam or rowwise Adagrad, `lingua.optim.row_update_`)
            read from the table and its moments and written back

The Triton kernels in `kernels.py` must agree with these; CPU tables take these functions (the
CPU path of zero-copy values), the tests run the kernels on CPU through the Triton interpreter.
Shapes: S slots, R table rows, D row width, U rows written.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lingua.optim import RowStep, row_update_


def gather_rows(table_RD: Tensor, rows_S: Tensor, out_dtype: torch.dtype) -> Tensor:
    """[S, D] in out_dtype: the rows of `table` listed in rows_S; slots holding -1 give zeros."""
    valid_S = rows_S >= 0
    out = table_RD.index_select(0, rows_S.clamp(min=0)).to(out_dtype)
    return out.masked_fill_(~valid_S.unsqueeze(1), 0)


def scatter_rows(table_RD: Tensor, rows_U: Tensor, values_UD: Tensor, low_precision_RD: Tensor | None = None) -> None:
    """table[rows] = values (rows unique); also writes the rows of `low_precision`, rounded once."""
    table_RD.index_copy_(0, rows_U, values_UD.to(table_RD.dtype))
    if low_precision_RD is not None:
        low_precision_RD.index_copy_(0, rows_U, values_UD.to(low_precision_RD.dtype))


def update_rows(table_RD: Tensor, low_precision_RD: Tensor | None, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> None:
    """The rows step.rows (unique) of the table, and of the moments (exp_avg, exp_avg_sq) when
    given, take one step of `row_update_`; the low-precision copy follows."""
    rows_U = step.rows
    p_rows = table_RD.index_select(0, rows_U).to(torch.promote_types(table_RD.dtype, torch.float32))
    m_rows, v_rows = (moments[0].index_select(0, rows_U), moments[1].index_select(0, rows_U)) if moments else (None, None)
    row_update_(p_rows, m_rows, v_rows, step)
    if moments:
        moments[0].index_copy_(0, rows_U, m_rows)
        moments[1].index_copy_(0, rows_U, v_rows)
    scatter_rows(table_RD, rows_U, p_rows, low_precision_RD)
