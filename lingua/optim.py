"""AdamW with tagged parameter groups, learning-rate schedules and global gradient-norm clipping.

The training loop calls `build_optimizer(model, args, n_steps, param_groups)` once and
`clip_gradients(params, optimizer, args)` once per optimizer step; apps pass extra `ParamGroupSpec`s
(memory values with their own fixed lr) and everything else falls into the default groups.
One optimizer (`AdamW`) serves dense groups (torch's fused / foreach AdamW) and row-sparse groups
(product-key values, whose gradients are sparse COO over rows: lazy or exact dense AdamW, or
rowwise Adagrad). A row-sparse parameter may live in host memory (zero-copy values): it then
carries `param.host_rows`, which holds its gradient on the compute device and reads and writes its
rows and its optimizer state there (`grad_of` finds either kind of gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Literal

import torch
from torch import Tensor, nn
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.adam import adam as functional_adam
from torch.optim.lr_scheduler import LambdaLR

from lingua.precision import accumulation_dtype


SchedulerName = Literal["constant", "linear", "inv_sqrt", "cosine", "wsd"]
RowUpdate = Literal["lazy", "dense", "rowwise_adagrad"]  # update rule of a row-sparse group (see AdamW)


@dataclass
class OptimArgs:
    RANGES: ClassVar[dict[str, str]] = {
        "lr": "> 0", "weight_decay": ">= 0", "epsilon": "> 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "clip": ">= 0",
        "warmup": ">= 0", "lr_min_ratio": "[0, 1]", "cycle_length": "> 0", "cosine_theta": "> 0", "decay_fraction": "(0, 1]",
        "exp_factor": "> 0", "annealing_step": "any",
    }

    lr: float = 3e-4  # base (peak) learning rate
    weight_decay: float = 0.1  # decoupled AdamW decay of matrices (1-D params and embeddings: see decay_norms_and_biases, decay_embeddings)
    epsilon: float = 1e-8  # Adam epsilon
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.95  # Adam second-moment decay
    clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still measured)
    clip_value_groups_separately: bool = False  # clip the row-sparse (memory value) groups and the rest each to `clip`, as the public Memory Layers code does
    scheduler: SchedulerName = "cosine"  # lr multiplier after warmup (see lr_multiplier)
    warmup: int = 100  # linear warmup steps: lr * (step+1)/(warmup+1), full lr at step `warmup`
    warmup_from_zero: bool = False  # warmup lr * step/warmup instead (0 at step 0, as the public Meta Lingua / Memory Layers code)
    lr_min_ratio: float = 0.1  # floor of the decay, as a fraction of the lr
    cycle_length: float = 1.0  # cosine: length of the descent as a fraction of the post-warmup steps (< 1: restarts from the peak after each)
    cosine_theta: float = 1.0  # cosine: progress exponent (> 1 keeps the lr high longer)
    decay_fraction: float = 0.1  # wsd: the decay takes this last fraction of the steps
    exp_factor: float = 0.5  # inv_sqrt: lr * ((warmup+1)/(step+1)) ** exp_factor
    annealing_step: int | None = None  # accepted for compatibility with the public Memory Layers configs; no effect (no schedule reads it there either)
    decay_embeddings: bool = False  # also apply weight decay to nn.Embedding tables
    decay_norms_and_biases: bool = False  # also apply weight decay to 1-D params (norm gains, biases), as the public Meta Lingua / Memory Layers code does


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
    row_update: RowUpdate | None = None  # None: dense params; set for params with row-sparse grads

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
    if args.cycle_length >= 1:
        angle = math.pi * progress**args.cosine_theta / args.cycle_length
    else:  # sawtooth: each cycle descends from the peak; the end of a cycle belongs to it, not to the next
        cycles = progress / args.cycle_length
        within = cycles - (math.ceil(cycles) - 1) if cycles > 0 else 0.0
        angle = math.pi * within**args.cosine_theta
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
    """Linear warmup (step+1)/(warmup+1) (step/warmup with warmup_from_zero), then the named
    schedule; progress runs 0 -> 1 from the end of warmup to n_steps and stays at 1 after it.

    constant: 1. linear: 1 -> lr_min_ratio. inv_sqrt: ((warmup+1)/(step+1))**exp_factor, floored.
    cosine: r + (1-r)(1 + cos(pi * progress**theta / cycle_length))/2 with r = lr_min_ratio;
    with cycle_length < 1, restarts: cos(pi * c**theta) where c runs 0 -> 1 in each cycle of
    cycle_length * (n_steps - warmup) steps.
    wsd: 1 until the last decay_fraction of the steps, then r + (1-r)(1 - sqrt(p)), p: 0 -> 1
    over the decay window (the "1-sqrt" cooldown).
    Warmup takes precedence: a run shorter than its warmup never leaves it.
    """
    if step < args.warmup:
        return step / args.warmup if args.warmup_from_zero else (step + 1) / (args.warmup + 1)
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
    """Unclaimed trainable parameters: matrices decay; norms, biases, other 1-D params (unless
    decay_norms_and_biases) and nn.Embedding tables (unless decay_embeddings) do not."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in claimed:
            continue
        excluded = (param.ndim < 2 and not args.decay_norms_and_biases) or (id(param) in embedding_ids and not args.decay_embeddings)
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


@dataclass(frozen=True)
class ColumnSharding:
    """How a row-sparse parameter split by columns across ranks (memory parallelism) is reduced,
    clipped and checkpointed; carried as `param.column_sharding`.

    mesh: 2-D ("replicate", "shard"): the shard dim's ranks hold the other column slices (the
    gradient norm sums over them), the replicate dim's ranks hold the same slice (the gradient
    sums over them, then is divided by `divisor`, the number of data-parallel ranks: a slice's
    gradient already sums the tokens of its whole shard group)."""

    mesh: DeviceMesh
    divisor: int

    @property
    def shard_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group(1)

    @property
    def replica_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group(0)

    @property
    def placements(self) -> tuple[Replicate, Shard]:
        return (Replicate(), Shard(1))

    def global_view(self, local: Tensor) -> DTensor:
        """The whole [R, V] tensor as a DTensor over this rank's slice (shares its memory)."""
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False)


def grad_of(param: Tensor) -> Tensor | None:
    """The gradient of a parameter: `.grad`, or for a host-memory parameter the sparse gradient
    its `host_rows` keeps on the compute device."""
    if param.grad is not None:
        return param.grad
    host = getattr(param, "host_rows", None)
    return host.grad if host is not None else None


def _set_grad(param: Tensor, grad: Tensor) -> None:
    host = getattr(param, "host_rows", None)
    if host is not None and param.grad is None:
        host.grad = grad
    else:
        param.grad = grad


def _row_gradient(param: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted unique rows, their gradients) of a row-sparse parameter; a dense gradient is every row."""
    grad = grad_of(param)
    assert grad is not None
    if not grad.is_sparse:
        return torch.arange(param.shape[0], device=grad.device), grad
    if grad.sparse_dim() != 1:
        raise ValueError("sparse gradients must be sparse over rows only (sparse_dim 1)")
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _row_mean_square(param: Tensor, grads_U: Tensor) -> Tensor:
    """[U] mean of each row's squared gradient over the whole row. A column-sharded parameter
    sums its slices' squares over the shard group (collective; every rank of a group holds the
    same rows, read by the group's tokens), so every rank keeps the same [R] accumulator."""
    sums_U = grads_U.pow(2).flatten(1).sum(dim=1)
    width = math.prod(param.shape[1:])
    sharding = getattr(param, "column_sharding", None)
    if sharding is not None:
        dist.all_reduce(sums_U, group=sharding.shard_group)
        width *= dist.get_world_size(sharding.shard_group)
    return sums_U / width


def _index_read(tensor: Tensor, rows: Tensor) -> Tensor:
    return tensor.index_select(0, rows)


def _index_write(tensor: Tensor, rows: Tensor, values: Tensor) -> None:
    tensor.index_copy_(0, rows, values.to(tensor.dtype))


@dataclass
class RowStep:
    """One optimizer step of some rows of a table under a row rule (see `row_update_`): lazy Adam
    sets the two bias corrections, rowwise Adagrad its denominator; the other rule's fields stay None."""

    rows: Tensor  # [U] unique row ids
    grads: Tensor  # [U, ...] their gradients
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    bias_correction1: Tensor | None = None  # [U] lazy Adam: 1 - beta1^t, t the row's own step count
    bias_correction2_sqrt: Tensor | None = None  # [U] lazy Adam: sqrt(1 - beta2^t)
    adagrad_denominator: Tensor | None = None  # [U] rowwise Adagrad: sqrt(accumulated mean square) + eps

    def __post_init__(self) -> None:
        adam_fields = (self.bias_correction1, self.bias_correction2_sqrt)
        if self.adagrad_denominator is None:
            one_rule = all(field is not None for field in adam_fields)
        else:
            one_rule = all(field is None for field in adam_fields)
        if not one_rule:
            raise ValueError(
                "RowStep: set bias_correction1 and bias_correction2_sqrt (lazy Adam) or adagrad_denominator "
                "(rowwise Adagrad), not fields of both rules"
            )

    @property
    def is_adam(self) -> bool:
        return self.adagrad_denominator is None


def row_update_(p_rows: Tensor, m_rows: Tensor | None, v_rows: Tensor | None, step: RowStep) -> None:
    """One step on gathered rows (p, m, v [U, ...]), in place:

    rowwise Adagrad (no moments): p = (1 - lr wd) p - lr g / adagrad_denominator;
    lazy Adam: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
               p = (1 - lr wd) p - lr (m / bias_correction1) / (sqrt(v) / bias_correction2_sqrt + eps).
    """
    shape = (-1,) + (1,) * (p_rows.dim() - 1)
    p_rows.mul_(1 - step.lr * step.weight_decay)
    if not step.is_adam:
        p_rows.addcdiv_(step.grads, step.adagrad_denominator.view(shape), value=-step.lr)
        return
    assert m_rows is not None and v_rows is not None, "lazy Adam updates the moments' rows"
    beta1, beta2 = step.betas
    m_rows.mul_(beta1).add_(step.grads, alpha=1 - beta1)
    v_rows.mul_(beta2).addcmul_(step.grads, step.grads, value=1 - beta2)
    bias_correction1, bias_correction2_sqrt = step.bias_correction1.view(shape), step.bias_correction2_sqrt.view(shape)
    p_rows.addcdiv_(m_rows / bias_correction1, (v_rows.sqrt() / bias_correction2_sqrt).add_(step.eps), value=-step.lr)


def update_rows_(table: Tensor, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> Tensor:
    """`row_update_` applied in place to rows step.rows of `table` (and of the moments, when given),
    read and written by index; returns the updated rows in the accumulation dtype."""
    p_rows = table.index_select(0, step.rows).to(accumulation_dtype(table.dtype))
    m_rows, v_rows = (moments[0].index_select(0, step.rows), moments[1].index_select(0, step.rows)) if moments else (None, None)
    row_update_(p_rows, m_rows, v_rows, step)
    if moments:
        moments[0].index_copy_(0, step.rows, m_rows)
        moments[1].index_copy_(0, step.rows, v_rows)
    table.index_copy_(0, step.rows, p_rows.to(table.dtype))
    return p_rows


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam over dense and row-sparse parameter groups.

    Dense groups (group["row_update"] is None) run torch's functional AdamW, fused when the optimizer
    is built fused (all params on CUDA), foreach otherwise. Row-sparse groups hold 2-D+ params whose
    gradient may be a sparse COO tensor over rows (dim 0); a dense gradient counts as every row:
      - "lazy": only the rows present this step are updated (moments, decay, parameter), each with
        its own step count for bias correction (SparseAdam-like; `row_step` state [R]);
      - "dense": exact AdamW on the implied dense gradient (absent rows have gradient 0: their
        moments decay and they keep moving), without ever building the dense gradient;
      - "rowwise_adagrad": rows present this step only; one accumulator per row, the mean of its
        squared gradient entries over the whole row (`row_sum_sq` [R], the same on every rank of a
        column-sharded table, so it is saved and loaded like a replicated tensor in any layout):
        w -= lr * g / (sqrt(acc) + eps), plus decay.
    Host-memory parameters (`param.host_rows`) take lazy or rowwise_adagrad; their state is
    allocated in host memory and their rows are read and written through host_rows.
    State is created for every parameter at construction, so torch.distributed.checkpoint sees a
    complete state before the first step.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, weight_decay: float, fused: bool) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, row_update=None, fused=fused)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["row_update"] not in (None, "lazy", "dense", "rowwise_adagrad"):
                raise ValueError(f"param group '{group.get('name')}': row_update={group['row_update']!r} must be lazy, dense or rowwise_adagrad")
            for param in group["params"]:
                self._init_state(param, group)

    def _init_state(self, param: Tensor, group: dict) -> None:
        state = self.state[param]
        if state:
            return
        kind = group["row_update"]
        on_device = group["fused"] and kind is None
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        host = getattr(param, "host_rows", None)
        if host is not None and kind not in ("lazy", "rowwise_adagrad"):
            raise ValueError(f"param group '{group.get('name')}': a host-memory parameter needs row_update lazy or rowwise_adagrad")
        if kind == "rowwise_adagrad":
            zeros = host.zeros if host is not None else lambda shape: torch.zeros(shape, device=param.device)
            state["row_sum_sq"] = zeros((param.shape[0],))
            return
        if host is not None:
            state["exp_avg"] = host.zeros(tuple(param.shape))
            state["exp_avg_sq"] = host.zeros(tuple(param.shape))
            state["row_step"] = host.zeros((param.shape[0],))
            return
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if kind == "lazy":
            state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["row_update"] is None:
                self._dense_step(group)
            else:
                for param in group["params"]:
                    if grad_of(param) is not None:
                        self._row_step(param, group)
        return loss

    def state_dict(self) -> dict:  # type: ignore[override]
        """torch's state dict; the per-element state of column-sharded parameters is presented as
        whole-table DTensors over the local slices, so checkpoints hold one table."""
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, state in state_dict["state"].items():
            sharding = getattr(params[index], "column_sharding", None)
            if sharding is not None:  # a new dict: torch's state dict shares the live per-param dicts
                state_dict["state"][index] = {
                    key: sharding.global_view(value) if isinstance(value, Tensor) and value.shape == params[index].shape else value
                    for key, value in state.items()
                }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        # Saved state is keyed as its param_groups list the params (indices, or names from DCP).
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = dict(zip(saved_keys, (p for group in self.param_groups for p in group["params"])))
        local_state = {
            index: {key: value.to_local() if isinstance(value, DTensor) and hasattr(params.get(index), "column_sharding") else value
                    for key, value in state.items()}
            for index, state in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": local_state})

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                host = getattr(param, "host_rows", None)
                if host is not None:
                    host.grad = None

    def _dense_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise ValueError(
                f"param group '{group.get('name')}' got a sparse gradient: put row-sparse params in a group with row_update"
            )
        for param in params:
            self._init_state(param, group)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        functional_adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=not group["fused"],
            fused=group["fused"],
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _row_step(self, param: Tensor, group: dict) -> None:
        self._init_state(param, group)
        state = self.state[param]
        rows, grad_rows = _row_gradient(param)
        host = getattr(param, "host_rows", None)
        read, write = (host.read, host.write) if host is not None else (_index_read, _index_write)
        if host is not None:
            rows, grad_rows = host.prepare(rows, grad_rows)  # this rank's rows, on the update device
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        kind = group["row_update"]
        if kind == "dense":
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            step = float(state["step"])
            param.mul_(1 - lr * weight_decay)
            exp_avg.mul_(beta1).index_add_(0, rows, grad_rows, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).index_add_(0, rows, grad_rows * grad_rows, alpha=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
            return
        acc_dtype = accumulation_dtype(param.dtype)
        if kind == "rowwise_adagrad":
            sum_sq = read(state["row_sum_sq"], rows) + _row_mean_square(param, grad_rows.to(acc_dtype))
            write(state["row_sum_sq"], rows, sum_sq)
            moments, rule_fields = None, {"adagrad_denominator": sum_sq.sqrt() + eps}
        else:  # lazy: rows present this step only, each with its own bias correction.
            row_step = read(state["row_step"], rows) + 1
            write(state["row_step"], rows, row_step)
            moments = (state["exp_avg"], state["exp_avg_sq"])
            rule_fields = {"bias_correction1": 1 - beta1**row_step, "bias_correction2_sqrt": (1 - beta2**row_step).sqrt()}
        step = RowStep(rows, grad_rows, lr, weight_decay, (beta1, beta2), eps, **rule_fields)
        if host is None:
            update_rows_(param, moments, step)
        else:  # on CUDA one kernel reads, updates and writes each host row once
            host.update(moments, step)
            host.sync()


def build_optimizer(
    model: nn.Module, args: OptimArgs, n_steps: int, param_groups: list[ParamGroupSpec] | None = None
) -> tuple[AdamW, LambdaLR]:
    """AdamW (fused when every parameter is on CUDA, foreach otherwise) over the default groups
    ("decay", "no_decay") plus `param_groups`, and a LambdaLR scheduler to step once per optimizer step.
    Each torch param group carries its spec's "name" and "row_update" (None for dense groups)."""
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
            "row_update": spec.row_update,
        }
        for spec in all_specs
    ]
    fused = all(p.device.type == "cuda" for group in groups if group["row_update"] is None for p in group["params"])
    optimizer = AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.epsilon, weight_decay=args.weight_decay, fused=fused)

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
    their own mesh) combine into one true global norm. Row-sparse (COO) gradients, host-memory
    parameters' included (see `grad_of`), are coalesced in place first (duplicate rows summed),
    then count and scale exactly like their dense equivalent. Call once per optimizer step.
    """
    params_by_mesh: dict[object, list[Tensor]] = {}
    sparse: list[Tensor] = []
    for param in params:
        grad = grad_of(param)
        if grad is None:
            continue
        if grad.is_sparse:
            if not grad.is_coalesced():
                _set_grad(param, grad.coalesce())
            sparse.append(param)
            continue
        mesh = grad.device_mesh if isinstance(grad, DTensor) else None
        params_by_mesh.setdefault(mesh, []).append(param)
    if not params_by_mesh and not sparse:
        return torch.zeros(())
    norms = []
    for group in params_by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    norms.extend(_sparse_norm(param, norm_type) for param in sparse)
    device = norms[0].device
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if max_norm > 0:
        for group in params_by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
        if sparse:
            coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
            for param in sparse:
                values = grad_of(param)._values()  # type: ignore[union-attr]
                values.mul_(coef.to(values.device, values.dtype))
    return total_norm


def clip_gradients(params: Iterable[Tensor], optimizer: torch.optim.Optimizer, args: OptimArgs) -> Tensor:
    """Clip once per optimizer step as `args` say: one global norm to `args.clip`, or with
    clip_value_groups_separately the row-sparse groups' parameters (memory values) and all the
    others each to `args.clip`. Returns the global norm of all gradients before clipping."""
    params = list(params)
    if not args.clip_value_groups_separately:
        return clip_grad_norm(params, args.clip)
    row_sparse = {id(p) for group in optimizer.param_groups if group["row_update"] is not None for p in group["params"]}
    values = [p for p in params if id(p) in row_sparse]
    others = [p for p in params if id(p) not in row_sparse]
    norms = [clip_grad_norm(values, args.clip), clip_grad_norm(others, args.clip)]
    device = norms[1].device if others else norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _sparse_norm(param: Tensor, norm_type: float) -> Tensor:
    """The norm of a row-sparse gradient; for a column-sharded parameter, over all its slices."""
    values = grad_of(param)._values()  # type: ignore[union-attr]
    norm = torch.linalg.vector_norm(values, norm_type)
    sharding = getattr(param, "column_sharding", None)
    if sharding is None:
        return norm
    if math.isinf(norm_type):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=sharding.shard_group)
        return norm
    powered = norm.pow(norm_type)
    dist.all_reduce(powered, group=sharding.shard_group)
    return powered.pow(1.0 / norm_type)


def all_reduce_row_grads(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None = None) -> None:
    """Average the row-sparse gradients of `optimizer`'s row groups over the ranks of `group`
    (collective); column-sharded parameters sum over their replicas and divide by their
    `ColumnSharding.divisor` instead. Every rank ends with the same coalesced gradient, bit for
    bit: the union of the ranks' rows (all-gathered), each rank's rows placed in a [union, ...]
    buffer, one all-reduce. A rank without a gradient for a parameter contributes zeros."""
    for param_group in optimizer.param_groups:
        if param_group["row_update"] is None:
            continue
        for param in param_group["params"]:
            sharding = getattr(param, "column_sharding", None)
            reduce_group = sharding.replica_group if sharding is not None else group
            world = dist.get_world_size(reduce_group)
            divisor = sharding.divisor if sharding is not None else world
            grad = grad_of(param)
            device = grad.device if grad is not None else _grad_device(param)
            if grad is None:
                rows = torch.zeros(0, dtype=torch.long, device=device)
                values = torch.zeros((0,) + tuple(param.shape[1:]), dtype=param.dtype, device=device)
            else:
                rows, values = _row_gradient(param)
            counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
            dist.all_gather(counts, torch.tensor([rows.numel()], device=device), group=reduce_group)
            longest = int(max(c.item() for c in counts))
            padded = torch.full((longest,), -1, dtype=torch.long, device=device)
            padded[: rows.numel()] = rows
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded, group=reduce_group)
            union = torch.unique(torch.cat(gathered))
            union = union[union >= 0]
            summed = torch.zeros((union.numel(),) + tuple(values.shape[1:]), dtype=values.dtype, device=device)
            summed[torch.searchsorted(union, rows)] = values
            dist.all_reduce(summed, group=reduce_group)
            summed /= divisor
            reduced = torch.sparse_coo_tensor(union.unsqueeze(0), summed, tuple(param.shape), is_coalesced=True, check_invariants=False)
            if grad is None and getattr(param, "host_rows", None) is None:
                param.grad = reduced
            else:
                _set_grad(param, reduced)


def _grad_device(param: Tensor) -> torch.device:
    """Where a parameter's gradient lives: its own device, or the compute device for host tables."""
    if getattr(param, "host_rows", None) is not None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return param.device
