"""The gated time-variant key scan of Memory Mosaics v2.

naive.py holds the explicit loop over time every faster form is tested against, chunked.py the torch
chunked scan, triton_scan.py the GPU kernels, op.py the `lingua::gated_key_scan` custom op and the
public `gated_key_scan`.
"""

from lingua.mosaics.gated_scan.chunked import gated_key_scan_chunked, scan_backward, scan_forward
from lingua.mosaics.gated_scan.naive import gated_key_scan_naive, gated_key_step, unit_key
from lingua.mosaics.gated_scan.op import (
    GATED_SCANS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    GatedImpl,
    gated_key_scan,
    gated_key_scan_op,
)

__all__ = [
    "GATED_SCANS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "GatedImpl",
    "gated_key_scan",
    "gated_key_scan_chunked",
    "gated_key_scan_naive",
    "gated_key_scan_op",
    "gated_key_step",
    "scan_backward",
    "scan_forward",
    "unit_key",
]
