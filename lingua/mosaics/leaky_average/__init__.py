"""The leaky average of Memory Mosaics: a per-head exponential moving average over time.

naive.py holds the explicit T x T reference, chunked.py the torch chunked scan, triton_scan.py the
GPU kernels, limits.py their tile limits, op.py the `lingua::leaky_scan` custom op and the public
`leaky_average`.
"""

from lingua.mosaics.leaky_average.chunked import discounted_sum_chunked, scan_backward, scan_forward
from lingua.mosaics.leaky_average.limits import MAX_CHUNK_SIZE
from lingua.mosaics.leaky_average.naive import discounted_sum_naive, leaky_average_naive, normalized_leaky_average_naive
from lingua.mosaics.leaky_average.op import SCANS, LeakyForm, LeakyImpl, leaky_average, leaky_scan_op

__all__ = [
    "MAX_CHUNK_SIZE",
    "SCANS",
    "LeakyForm",
    "LeakyImpl",
    "discounted_sum_chunked",
    "discounted_sum_naive",
    "leaky_average",
    "leaky_average_naive",
    "leaky_scan_op",
    "normalized_leaky_average_naive",
    "scan_backward",
    "scan_forward",
]
