"""AdamW with tagged parameter groups, learning-rate schedules and global gradient-norm clipping.

The training loop calls `build_optimizer(model, args, n_steps, param_groups)` once and
`clip_grad_norm(params, args.clip)` once per optimizer step; apps pass extra `ParamGroupSpec`s
(memory values with their own fixed lr) and everything else falls into the default groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from lingua.args import ConfigError

SchedulerName = Literal["constant", "linear", "inv_sqrt", "cosine", "wsd"]


@dataclass
class OptimArgs:
    lr: float = 3e-4  # base (peak) learning rate
    weight_decay: float = 0.1  # decoupled AdamW decay of matrices (not norms, biases, other 1-D params)
    epsilon: float = 1e-8  # Adam epsilon
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.95  # Adam second-moment decay
    clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still measured)
    scheduler: SchedulerName = "cosine"  # lr multiplier after warmup (see lr_multiplier)
    warmup: int = 100  # linear warmup steps: lr * (step+1)/(warmup+1), full lr at step `warmup`
    lr_min_ratio: float = 0.1  # floor of the decay, as a fraction of the lr
    cycle_length: float = 1.0  # cosine: period as a fraction of the post-warmup steps (< 1: restarts)
    cosine_theta: float = 1.0  # cosine: progress exponent (> 1 keeps the lr high longer)
    decay_fraction: float = 0.1  # wsd: the decay takes this last fraction of the steps
    exp_factor: float = 0.5  # inv_sqrt: lr * ((warmup+1)/(step+1)) ** exp_factor
    decay_embeddings: bool = False  # also apply weight decay to nn.Embedding tables

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "epsilon": self.epsilon, "cycle_length": self.cycle_length}
        positive |= {"cosine_theta": self.cosine_theta, "exp_factor": self.exp_factor}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"optim.{key}={value} must be positive")
        for key in ("weight_decay", "clip", "warmup"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"optim.lr_min_ratio={self.lr_min_ratio} must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")


@dataclass
class ParamGroupSpec:
    """A tagged group of parameters with its own lr / weight decay.

    A group with a fixed `lr` keeps that lr for the whole run (no warmup, no decay) unless
    `follow_schedule=True`; a group at the base lr follows the schedule unless told otherwise.
    """

    name: str  # shown in logs and stored in the optimizer state ("memory_values", ...)
    params: list[nn.Parameter] = field(default_factory=list)  # parameters of the model
    lr: float | None = None  # None: OptimArgs.lr
    weight_decay: float | None = None  # None: OptimArgs.weight_decay, applied to every param of the group
    follow_schedule: bool | None = None  # None: True when lr is None, False for a fixed lr

    @property
    def follows_schedule(self) -> bool:
        return self.lr is None if self.follow_schedule is None else self.follow_schedule


# ---------------------------------------------------------------------------------------------
# Schedules: multipliers of each group's lr, as a function of the optimizer step (0-based).


def _constant(progress: float, step: int, args: OptimArgs) -> float:
    return 1.0


def _linear(progress: float, step: int, args: OptimArgs) -> float:
    return args.lr_min_ratio + (1 - args.lr_min_ratio) * (1 - progress)


def _inv_sqrt(progress: float, step: int, args: OptimArgs) -> float:
    return max(((args.warmup + 1) / (step + 1)) ** args.exp_factor, args.lr_min_ratio)


def _cosine(progress: float, step: int, args: OptimArgs) -> float:
    angle = math.pi * progress**args.cosine_theta / args.cycle_length
    return args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(angle))


SCHEDULES: dict[str, Callable[[float, int, OptimArgs], float]] = {
    "constant": _constant,
    "linear": _linear,
    "inv_sqrt": _inv_sqrt,
    "cosine": _cosine,
}


def wsd_decay_steps(args: OptimArgs, n_steps: int) -> int:
    return max(1, round(args.decay_fraction * n_steps))


def lr_multiplier(step: int, args: OptimArgs, n_steps: int) -> float:
    """Linear warmup (step+1)/(warmup+1), then the named schedule; progress runs 0 -> 1 from the end
    of warmup to n_steps and stays at 1 after it.

    constant: 1. linear: 1 -> lr_min_ratio. inv_sqrt: ((warmup+1)/(step+1))**exp_factor, floored.
    cosine: r + (1-r)(1 + cos(pi * progress**theta / cycle_length))/2 with r = lr_min_ratio.
    wsd: 1 until the last decay_fraction of the steps, then r + (1-r)(1 - sqrt(p)), p: 0 -> 1
    over the decay window (the "1-sqrt" cooldown).
    Warmup takes precedence: a run shorter than its warmup never leaves it.
    """
    if step < args.warmup:
        return (step + 1) / (args.warmup + 1)
    if args.scheduler == "wsd":
        decay_steps = wsd_decay_steps(args, n_steps)
        decay_progress = min(max(step - (n_steps - decay_steps), 0) / decay_steps, 1.0)
        return args.lr_min_ratio + (1 - args.lr_min_ratio) * (1 - math.sqrt(decay_progress))
    progress = min((step - args.warmup) / max(n_steps - args.warmup, 1), 1.0)
    return SCHEDULES[args.scheduler](progress, step, args)


def _no_schedule(step: int) -> float:
    return 1.0


# ---------------------------------------------------------------------------------------------
# Optimizer


def _default_groups(model: nn.Module, args: OptimArgs, claimed: set[int]) -> list[ParamGroupSpec]:
    """Unclaimed trainable parameters: matrices decay; norms, biases, other 1-D params and
    (unless decay_embeddings) nn.Embedding tables do not."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in claimed:
            continue
        excluded = param.ndim < 2 or (id(param) in embedding_ids and not args.decay_embeddings)
        (no_decay if excluded else decay).append(param)
    return [ParamGroupSpec("decay", decay), ParamGroupSpec("no_decay", no_decay, weight_decay=0.0)]


def _check_specs(model: nn.Module, specs: list[ParamGroupSpec]) -> set[int]:
    """Every spec param belongs to the model and to one group only; returns the claimed ids."""
    model_ids = {id(p) for p in model.parameters()}
    owner: dict[int, str] = {}
    names = {"decay", "no_decay"}
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"param group name '{spec.name}' is used twice (decay and no_decay are built in)")
        names.add(spec.name)
        if spec.lr is not None and spec.lr <= 0:
            raise ValueError(f"param group '{spec.name}': lr={spec.lr} must be positive or None")
        for param in spec.params:
            if id(param) not in model_ids:
                raise ValueError(f"param group '{spec.name}' holds a parameter that is not in the model")
            if id(param) in owner:
                raise ValueError(f"a parameter is in both param groups '{owner[id(param)]}' and '{spec.name}'")
            owner[id(param)] = spec.name
    return set(owner)


def build_optimizer(
    model: nn.Module, args: OptimArgs, n_steps: int, param_groups: list[ParamGroupSpec] | None = None
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW (fused when every parameter is on CUDA, foreach otherwise) over the default groups
    ("decay", "no_decay") plus `param_groups`, and a LambdaLR scheduler to step once per optimizer step.
    Each torch param group carries its spec's "name"."""
    if n_steps <= 0:
        raise ValueError(f"n_steps={n_steps} must be positive")
    specs = list(param_groups or [])
    claimed = _check_specs(model, specs)
    all_specs = [s for s in _default_groups(model, args, claimed) + specs if any(p.requires_grad for p in s.params)]
    groups = [
        {
            "name": spec.name,
            "params": [p for p in spec.params if p.requires_grad],
            "lr": args.lr if spec.lr is None else spec.lr,
            "weight_decay": args.weight_decay if spec.weight_decay is None else spec.weight_decay,
        }
        for spec in all_specs
    ]
    fused = all(p.device.type == "cuda" for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(
        groups,
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.epsilon,
        weight_decay=args.weight_decay,
        fused=fused,
        foreach=not fused,
    )

    def schedule(step: int) -> float:
        return lr_multiplier(step, args, n_steps)

    scheduler = LambdaLR(optimizer, [schedule if spec.follows_schedule else _no_schedule for spec in all_specs])
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# Clipping


def clip_grad_norm(params: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale all gradients so their global norm is at most max_norm (max_norm <= 0: measure only).

    Returns the norm before clipping as a tensor (no host sync). Sharded (DTensor) gradients are
    reduced per device mesh with `full_tensor()`, so params on different meshes (memory values on
    their own mesh) combine into one true global norm. Call once per optimizer step.
    """
    params_by_mesh: dict[object, list[Tensor]] = {}
    for param in params:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            params_by_mesh.setdefault(mesh, []).append(param)
    if not params_by_mesh:
        return torch.zeros(())
    norms = []
    for group in params_by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if max_norm > 0:
        for group in params_by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
    return total_norm
