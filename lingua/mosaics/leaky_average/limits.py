"""Tile limits of the leaky-average Triton kernels, in a module that needs no Triton: triton_scan.py
enforces them, op.py and the model config check chunk sizes against them on any platform.
"""

# Largest chunk of the Triton kernels: their backward holds three [chunk, chunk] decay tiles in
# shared memory, and at 128 the fp32 kernel needs 260 KiB, more than a Hopper block has (227 KiB).
MAX_CHUNK_SIZE = 64
