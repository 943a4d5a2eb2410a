"""Streaming safetensors writer and the folder readers of `lingua.hf`.

`write_safetensors` writes the file format (8-byte header length, JSON header, raw little-endian
tensor bytes) itself, copying each tensor to the file in bounded slices: a host-memory value table
(zero-copy, or memory-mapped from a consolidated checkpoint) goes from host memory to disk without a
second full copy and without ever touching a GPU. Reading goes through the `safetensors` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

# torch dtype -> safetensors dtype name (the file format's spelling)
SAFETENSORS_DTYPES: Mapping[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SLICE_BYTES = 64 << 20  # bytes copied to the file at a time: bounds the extra host memory of a write


def _byte_view(tensor: Tensor) -> Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (a view of a contiguous host tensor)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor on {tensor.device}: the writer streams host memory only (load state dicts on the CPU)")
    flat = tensor.detach().contiguous().reshape(-1)
    return (flat.to(torch.uint8) if flat.dtype == torch.bool else flat).view(torch.uint8)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, Tensor]], metadata: Mapping[str, str] | None = None, slice_bytes: int = SLICE_BYTES) -> None:
    """Write (name, tensor) pairs, in that order, to a safetensors file at `path`.

    A contiguous host tensor is written straight from its own memory, `slice_bytes` at a time (no
    copy of it is made); others are made contiguous first. Names must be unique."""
    items = list(tensors)
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in items:
        if name in header:
            raise ValueError(f"tensor name '{name}' appears twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for _, tensor in items:
            _write_tensor(file, tensor, slice_bytes)
        file.flush()
        os.fsync(file.fileno())


def _write_tensor(file, tensor: Tensor, slice_bytes: int) -> None:
    data = _byte_view(tensor)
    for start in range(0, data.numel(), slice_bytes):
        file.write(data[start : start + slice_bytes].numpy().data)


def read_header(path: str | Path) -> dict[str, object]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, metadata)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        if size <= 0 or size > 100 << 20:
            raise ValueError(f"'{path}' is not a safetensors file (header length {size})")
        return json.loads(file.read(size))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")
