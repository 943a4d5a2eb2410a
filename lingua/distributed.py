"""Where a process runs and how the model is spread over processes.

`DistributedArgs` is the `distributed:` section of every training config (field names follow
the public lingua / Memory Layers configs). This module detects the launch environment (single
process, torchrun, SLURM), initializes the process group, builds the device mesh and applies
data parallelism (FSDP2 / DDP / HSDP) to a model; the trainer asks it for a `DistributedEnv` and
never reads launcher variables itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import subprocess
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lingua.args import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    RANGES: ClassVar[dict[str, str]] = {"dp_shard": ">= 1", "dp_replicate": ">= 1", "tp_size": ">= 1", "memory_parallel_size": ">= 1", "timeout_s": ">= 1"}

    dp_shard: int = 1  # ranks a parameter is sharded over (FSDP); the rest replicate
    dp_replicate: int = 1  # replica groups; dp_replicate * dp_shard * tp_size = world size (fixed up if not)
    tp_size: int = 1  # tensor-parallel degree
    fsdp_type: Literal["no_shard", "full_shard"] = "no_shard"  # no_shard: replicas (DDP-like); full_shard: FSDP2 (hybrid when dp_replicate > 1)
    model_dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (bf16: autocast / FSDP param dtype; master weights stay fp32)
    compile: bool = False  # torch.compile each block
    selective_activation_checkpointing: bool = False  # recompute cheap ops in backward, keep matmul outputs
    checkpoint_each_layer: bool = False  # full activation checkpointing of every block
    matmul_allow_tf32: bool = False  # allow TF32 matmuls on Ampere+ GPUs
    memory_parallel_size: int = 1  # consecutive ranks a product-key value table is sharded over by columns
    timeout_s: int = 600  # a collective waiting longer than this fails the job (a dead or hung rank)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("distributed.device=cuda but no CUDA device is visible; use distributed.device=auto or cpu")


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


def local_world_size() -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE, or under SLURM this
    node's entry of the tasks-per-node list (SLURM_STEP_TASKS_PER_NODE, else SLURM_TASKS_PER_NODE,
    e.g. "4(x2),3", indexed by SLURM_NODEID); 1 otherwise."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if "SLURM_JOB_ID" not in os.environ or "SLURM_PROCID" not in os.environ or not tasks:
        return 1
    per_node: list[int] = []
    for entry in tasks.split(","):
        count, _, repeat = entry.partition("(x")
        per_node += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return per_node[int(os.environ.get("SLURM_NODEID", "0"))]


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


def autocast_dtype(model_dtype: str) -> torch.dtype | None:
    """The autocast dtype of a compute dtype name (`distributed.model_dtype`, an eval's `dtype`):
    bf16 -> torch.bfloat16; fp32 -> None (no autocast)."""
    return torch.bfloat16 if model_dtype == "bf16" else None


# ---------------------------------------------------------------------------------------------
# Process group and mesh


def _slurm_master() -> tuple[str, int]:
    """First host of the SLURM node list and a port derived from the job id (same on every task)."""
    nodes = os.environ["SLURM_JOB_NODELIST"]
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True).stdout.split()
        host = hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        host = nodes.split(",")[0].split("[")[0]  # a single plain host name
    port = random.Random(int(os.environ["SLURM_JOB_ID"])).randint(20_000, 60_000)
    return host, port


def init_distributed(args: DistributedArgs) -> DistributedEnv:
    """Detect the launcher, pick the device and, for more than one process, join the process
    group (nccl on GPU, gloo on CPU) with `timeout_s` on every collective."""
    env = detect_env(args)
    if env.world_size > 1 and not dist.is_initialized():
        if "LOCAL_RANK" not in os.environ:  # SLURM tasks: rendezvous through the first node
            host, port = _slurm_master()
            os.environ.setdefault("MASTER_ADDR", host)
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size))
        dist.init_process_group(
            backend="nccl" if env.device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=args.timeout_s),
            device_id=env.device if env.device.type == "cuda" else None,
        )
    return env


def resolve_parallel_sizes(args: DistributedArgs, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) multiplying to world_size; dp_replicate absorbs the rest. Also
    checks that memory_parallel_size fits the processes (before the run writes anything)."""
    inner = args.dp_shard * args.tp_size
    if world_size % inner != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by distributed.dp_shard * distributed.tp_size = {inner}: "
            "set them to divisors of the number of processes"
        )
    dp_replicate = world_size // inner
    if args.dp_replicate not in (1, dp_replicate):
        raise ConfigError(
            f"distributed.dp_replicate={args.dp_replicate} does not fit {world_size} processes with dp_shard="
            f"{args.dp_shard} and tp_size={args.tp_size}; use dp_replicate={dp_replicate}"
        )
    if args.fsdp_type == "no_shard" and args.dp_shard > 1:
        raise ConfigError("distributed.fsdp_type=no_shard replicates parameters: set dp_shard=1 or fsdp_type=full_shard")
    size = args.memory_parallel_size
    if size > 1 and (world_size % size != 0 or args.tp_size > 1):
        raise ConfigError(
            f"distributed.memory_parallel_size={size} must divide the {world_size} processes and needs tp_size=1 "
            f"(got tp_size={args.tp_size})"
        )
    return dp_replicate, args.dp_shard, args.tp_size


def build_mesh(args: DistributedArgs, env: DistributedEnv) -> DeviceMesh | None:
    """A ("dp_replicate", "dp_shard", "tp") device mesh, or None for a single process."""
    if env.world_size == 1:
        return None
    sizes = resolve_parallel_sizes(args, env.world_size)
    return init_device_mesh(env.device.type, sizes, mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This process's data-parallel rank and the data-parallel size (tp ranks share data)."""
    if mesh is None:
        return 0, 1
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return replicate.get_local_rank() * shard.size() + shard.get_local_rank(), replicate.size() * shard.size()


def dp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of all data-parallel ranks (replicas and shards together)."""
    return mesh["dp_replicate", "dp_shard"]._flatten().get_group()


def dp_mean(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Mean of a scalar over the data-parallel ranks (a no-op in one process)."""
    if mesh is None:
        return value
    group = dp_group(mesh)
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Parallelization, always in this order: tensor parallel -> activation checkpointing ->
# per-block compile -> FSDP2 (torchtitan's order; each step expects the previous one's modules).

# Ops whose outputs selective activation checkpointing keeps; everything else is recomputed.
_SAVE_OUTPUTS_OF = (
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
)


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OUTPUTS_OF else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(block: nn.Module, selective: bool) -> nn.Module:
    if selective:
        return checkpoint_wrapper(block, context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
    return checkpoint_wrapper(block)


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()]) if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)


def _local_outputs(module: nn.Module, outputs: object, mesh: DeviceMesh) -> object:
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


def replicate_remaining_params(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make every parameter the TP plan left as a plain tensor (embeddings, norms, head) a replicated
    DTensor on the TP mesh, so the optimizer and clipping see one kind of tensor. Such a module takes
    replicated inputs and returns a plain tensor, so the code around it is unchanged."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(isinstance(p, DTensor) for p in own):
            distribute_module(module, tp_mesh, input_fn=_replicated_inputs, output_fn=_local_outputs)


@dataclass(frozen=True)
class ParallelPlan:
    """What a model tells `parallelize` about itself."""

    blocks: nn.ModuleList  # the repeated blocks: each is checkpointed, compiled and sharded on its own
    tensor_parallel: Callable[[nn.Module, DeviceMesh], None] | None = None  # applies TP in place
    ignored_params: Callable[[nn.Module], set[nn.Parameter]] | None = None  # never wrapped by FSDP: replicated on every rank (memory values; the trainer averages their row-sparse gradients)
    memory_parallel: Callable[[nn.Module, DeviceMesh, int], None] | None = None  # shards memory tables by columns: (model, ("replicate", "shard") mesh, data-parallel size)


def parallelize(model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh | None, args: DistributedArgs) -> nn.Module:
    """TP -> memory parallelism -> activation checkpointing -> per-block compile -> FSDP2, as configured."""
    if mesh is not None and args.tp_size > 1:
        if plan.tensor_parallel is None:
            raise ConfigError("distributed.tp_size > 1 but this model has no tensor-parallel plan")
        plan.tensor_parallel(model, mesh["tp"])
        replicate_remaining_params(model, mesh["tp"])
    if args.memory_parallel_size > 1:
        _apply_memory_parallel(model, plan, mesh, args)
    for index, block in enumerate(plan.blocks):
        if args.checkpoint_each_layer or args.selective_activation_checkpointing:
            block = apply_activation_checkpointing(block, selective=not args.checkpoint_each_layer)
        if args.compile:
            block.compile()
        plan.blocks[index] = block
    if mesh is not None and mesh["dp_replicate"].size() * mesh["dp_shard"].size() > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"]
        param_dtype = torch.bfloat16 if args.model_dtype == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        ignored = plan.ignored_params(model) if plan.ignored_params else None
        for block in plan.blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
    return model


def _apply_memory_parallel(model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh | None, args: DistributedArgs) -> None:
    """Shard the model's memory tables by columns over groups of memory_parallel_size consecutive
    ranks (one process: nothing to shard, a warning)."""
    size = args.memory_parallel_size
    if plan.memory_parallel is None:
        raise ConfigError(f"distributed.memory_parallel_size={size} but this model has no memory tables to shard: set it to 1")
    if mesh is None:
        logger.warning("distributed.memory_parallel_size=%d in a single process: the memory tables stay whole", size)
        return
    world = mesh.size()  # a multiple of size with tp_size=1 (resolve_parallel_sizes)
    memory_mesh = init_device_mesh(mesh.device_type, (world // size, size), mesh_dim_names=("memory_replicate", "memory_shard"))
    plan.memory_parallel(model, memory_mesh, dp_rank_and_size(mesh)[1])
