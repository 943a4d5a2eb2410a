"""Zero-copy product-key values: the table and its optimizer state in host memory, read and
updated by the GPU over UVA (`values.py`), host allocation (`host.py`), the forward buffer's
capacity (`capacity.py`), row-transfer kernels (`kernels.py`) beside their torch reference (`naive.py`)."""

from lingua.product_key.zero_copy.capacity import BufferCapacity
from lingua.product_key.zero_copy.host import HostMemory, available_host_bytes, check_host_capacity, fill_normal_
from lingua.product_key.zero_copy.kernels import HostPointer, gather_rows, scatter_rows
from lingua.product_key.zero_copy.values import Dedup, HostRows, TransferDtype, UpdatePlace, ZeroCopyValues, dedup_rows

__all__ = [
    "BufferCapacity", "Dedup", "HostMemory", "HostPointer", "HostRows", "TransferDtype", "UpdatePlace", "ZeroCopyValues", "available_host_bytes", "check_host_capacity",
    "dedup_rows", "fill_normal_", "gather_rows", "scatter_rows",
]
