"""Capacity of the zero-copy forward buffer: how many unique rows a bag call gathers onto the
compute device, chosen from the unique-row counts of earlier calls, read without a host sync.

Each call's unique-row count U and overflow max(U - C, 0) are copied from the device into pinned
host memory without blocking; later calls read the copies whose CUDA event has completed (a
non-blocking query), never waiting for one. The capacity of a call with N*L lookups of an R-row
table is

    C = min(N*L, R, round_up(margin * max U of the last WINDOW calls read, ROUND_ROWS))

and min(N*L, R, first_rows) before any count was read (first_rows 0: min(N*L, R), which never
overflows). While gradients are recorded the limit changes only at the first call after an
optimizer update of the table (`HostRows.updates`): every forward of one step, and the recompute
of an activation-checkpointed forward in its backward, see the same capacity. Slots >= C (the
overflow) are read by the bag from the host table (exact, but once per lookup over PCIe); reading
an overflow count logs one warning line, and the next limit covers that count. `ZeroCopyValues`
(values.py) owns one per table.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ROUND_ROWS = 128  # capacities are multiples of this (fewer distinct buffer sizes for the allocator)
WINDOW = 64  # calls whose unique-row counts bound the next capacity (several memory layers per step)


class BufferCapacity:
    """Rows of the zero-copy forward buffer (see module docstring)."""

    def __init__(self, margin: float = 1.25, first_rows: int = 0) -> None:
        if margin < 1:
            raise ValueError(f"buffer margin {margin} must be >= 1 (a capacity below the unique rows always overflows)")
        if first_rows < 0:
            raise ValueError(f"first buffer rows {first_rows} must be >= 0 (0: the bound min(N*L, R))")
        self.margin, self.first_rows = margin, first_rows
        self._pending: deque[tuple[Tensor, torch.cuda.Event | None, int]] = deque()  # ([U, overflow], copy done, C)
        self._recent: deque[int] = deque(maxlen=WINDOW)  # unique-row counts read
        self._limit: int | None = None  # rows allowed by the recent counts; None: no count read yet
        self._chosen_at: int | None = None  # table updates when the limit was chosen
        self.rows = 0  # capacity of the latest call
        self.overflow_calls = 0  # calls read back as overflowing
        self.overflow_rows = 0  # their rows beyond the capacity, summed

    def choose(self, n_lookups: int, n_rows: int, updates: int) -> int:
        """The capacity of a call of n_lookups into an n_rows table, the table having taken
        `updates` optimizer steps. Reads only counts whose copies already completed."""
        self._collect()
        if not torch.is_grad_enabled() or self._chosen_at != updates:
            self._chosen_at = updates
            if self._recent:
                wanted = max(1, math.ceil(self.margin * max(self._recent)))
                self._limit = -(-wanted // ROUND_ROWS) * ROUND_ROWS
            else:
                self._limit = self.first_rows or None
        bound = min(n_lookups, n_rows)
        self.rows = bound if self._limit is None else min(bound, self._limit)
        return self.rows

    def record(self, n_unique: Tensor, capacity: int) -> None:
        """Start copying a call's unique-row count (a device scalar) and overflow to the host."""
        counts = torch.stack([n_unique, (n_unique - capacity).clamp(min=0)])
        if not counts.is_cuda:
            self._pending.append((counts, None, capacity))
            return
        host = torch.empty(2, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((host, done, capacity))

    def _collect(self) -> None:
        """Read the counts whose copies completed, in call order; warn once for the overflows among them."""
        overflowed, beyond, worst = 0, 0, (0, 0, 0)  # worst: (overflow, U, C) of the largest overflow
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            counts, _, capacity = self._pending.popleft()
            n_unique, overflow = counts.tolist()
            self._recent.append(n_unique)
            if overflow > 0:
                overflowed, beyond, worst = overflowed + 1, beyond + overflow, max(worst, (overflow, n_unique, capacity))
        if overflowed:
            self.overflow_calls += overflowed
            self.overflow_rows += beyond
            logger.warning(
                "zero-copy buffer overflow in %d bag call(s) (worst: %d unique rows, buffer of %d): %d rows in all were read "
                "from host memory once per lookup (exact, slower); the next buffers hold %.2fx the recent unique rows",
                overflowed, worst[1], worst[2], beyond, self.margin,
            )
