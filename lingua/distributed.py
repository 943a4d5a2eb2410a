"""Where a process runs: rank, world size, device, precision and compile settings.

`DistributedArgs` is the `distributed:` section of every training config. This module detects
the launch environment (single process, torchrun, SLURM) and picks the device; the trainer asks
it for `DistributedEnv` and never reads launcher variables itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class DistributedArgs:
    model_dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (bf16: autocast; parameters stay fp32)
    compile: bool = False  # torch.compile the model's blocks
    matmul_allow_tf32: bool = False  # allow TF32 matmuls on Ampere+ GPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("distributed.device=cuda but no CUDA device is visible; use distributed.device=auto or cpu")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun or SLURM variables; (0, 0, 1) otherwise."""
    if "LOCAL_RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 0, 1


def detect_env(args: DistributedArgs) -> DistributedEnv:
    rank, local_rank, world_size = _launcher_ranks()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    else:
        device = torch.device("cpu")
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def autocast_dtype(args: DistributedArgs) -> torch.dtype | None:
    return torch.bfloat16 if args.model_dtype == "bf16" else None
