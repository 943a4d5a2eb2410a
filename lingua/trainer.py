"""The one training loop every app plugs into.

An app hands `train()` its config (a subclass of `TrainArgs` that adds a `model` section) and a
`ModelSpec`: how to build its model for a vocabulary, its parameter groups and its FLOPs per token.
The loop owns everything else: seeds, data, precision, gradient accumulation, clipping once per
optimizer step, validation, metrics, profiling, checkpoints with exact resume (a rerun's config
checked against its checkpoint's first, lingua.resume).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lingua.args import dump_config, to_dict
from lingua.checkpoint import (
    CheckpointArgs, CheckpointManager, check_writable, load_model_weights, resolve_init_weights, rng_state, set_rng_state,
)
from lingua.data import DataArgs, DataLoaderState, build_dataloader, init_dataloader_state, iter_validation_batches, prepare_sources
from lingua.distributed import (
    DistributedArgs,
    DistributedEnv,
    ParallelPlan,
    autocast_dtype,
    build_mesh,
    dp_group,
    dp_mean,
    dp_rank_and_size,
    init_distributed,
    parallelize,
)
from lingua.evaluation import EvalArgs
from lingua.metrics import LoggingArgs, MetricLogger, NullLogger, RecentStepRate, Throughput, device_peak_flops, memory_stats, metric_path, progress_line
from lingua.optim import OptimArgs, ParamGroupSpec, all_reduce_row_grads, build_optimizer, clip_gradients
from lingua.preemption import REQUEUE_SIGNALS, PreemptionWatcher, requeue_slurm_job
from lingua.profiling import ProfilerArgs, maybe_profile
from lingua.resume import check_resume, log_resume
from lingua.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger("lingua")
T = TypeVar("T")


@dataclass
class ValidationArgs:
    RANGES: ClassVar[dict[str, str]] = {"every": ">= 0", "max_batches": "any", "batch_size": ">= 1"}

    every: int = 0  # validation loss every this many steps, and at the start and end (0: never)
    max_batches: int = 20  # batches per source (None-like: <= 0 reads every val line once)
    batch_size: int | None = None  # None: data.batch_size


@dataclass
class TrainArgs:
    """Everything a training run needs except the model; apps subclass it with a `model` field."""

    RANGES: ClassVar[dict[str, str]] = {"seed": ">= 0", "steps": ">= 1", "grad_acc_steps": ">= 1", "preemption_check_every": ">= 1"}

    name: str = "debug"  # run name (metrics, wandb)
    dump_dir: str = ""  # config, metrics and checkpoints go here; empty: runs/<name>
    seed: int = 42  # seeds python, numpy and torch (model init uses the model's own seed)
    steps: int = 1000  # optimizer steps
    grad_acc_steps: int = 1  # micro-batches per optimizer step
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop naming the step, or skip its update (checked every step; the schedule still advances)
    preemption_check_every: int = 10  # with several ranks, steps between their agreement on a stop signal (an all-reduce and a host sync); 1: every step
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)
    eval: EvalArgs | None = None  # evaluate the checkpoints saved every checkpoint.eval.every steps (lm-eval tasks, val loss)

    def __post_init__(self) -> None:
        if not self.dump_dir:
            self.dump_dir = f"runs/{self.name}"


@dataclass(frozen=True)
class ModelSpec:
    """What an app tells the loop about its model."""

    build: Callable[[Any, Tokenizer], nn.Module]  # (model args, tokenizer) -> module (called on the meta device)
    flops_per_token: Callable[[nn.Module, int], float]  # (model, seq_len) -> training FLOPs per token
    param_groups: Callable[[nn.Module, OptimArgs], list[ParamGroupSpec]] | None = None  # None: default groups
    log_metrics: Callable[[nn.Module], dict[str, float]] | None = None  # extra metrics at each log step (reset by the call)
    evaluate: Callable[[Any, Path, int], dict[str, float]] | None = None  # (cfg, checkpoint folder, step) -> eval metrics
    model_seed: Callable[[Any], int] = lambda model_args: getattr(model_args, "seed", 0)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    step: int
    preempted_by: str | None  # the signal that stopped the run early (after saving), if any
    losses: dict[int, float]  # loss per optimizer step logged by this run
    val_losses: dict[int, float]
    skipped_steps: list[int]  # steps whose update was skipped for a non-finite loss (on_nonfinite=skip)
    dump_dir: Path
    last_checkpoint: Path | None

    @property
    def exit_code(self) -> int:
        """The training command's exit status: 130 (interrupted, as shells report Ctrl-C) after a
        Ctrl-C save, so `train && eval` stops there; 0 otherwise (a SIGTERM / SIGUSR1 save included)."""
        return 130 if self.preempted_by == "SIGINT" else 0


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings and errors only on the other ranks (prefixed with their rank)."""
    if not logging.getLogger().handlers:
        prefix = f"[rank {rank}] " if rank else ""
        logging.basicConfig(format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _build_model(cfg: TrainArgs, spec: ModelSpec, tokenizer: Tokenizer, env: DistributedEnv, mesh: DeviceMesh | None) -> nn.Module:
    """Build on the meta device, materialize on the target device, initialize every tensor with the
    model seed (identical on every rank), then parallelize (TP -> AC -> compile -> FSDP)."""
    with torch.device("meta"):
        model = spec.build(cfg.model, tokenizer)  # type: ignore[attr-defined]
    for module in model.modules():  # modules owning host storage (zero-copy tables): one copy per node
        if hasattr(module, "materialize"):
            module.materialize(share_with_node=True)
    model = model.to_empty(device=env.device)
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(spec.model_seed(cfg.model))  # type: ignore[attr-defined]
        model.init_weights()
    plan = model.parallel_plan() if hasattr(model, "parallel_plan") else ParallelPlan(blocks=nn.ModuleList())
    return parallelize(model, plan, mesh, cfg.distributed)


def _to_device(batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(batch)
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    return tokens[..., 0], tokens[..., 1]


IGNORED_TARGET = -100  # a target no loss counts: torch's cross-entropy default, which the apps' models use


def _pad_rows(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """[batch_size, T, views]: a short batch completed with rows whose targets are all ignored,
    so the loss is the short batch's while every rank's forward has one shape."""
    missing = batch_size - batch.shape[0]
    if missing <= 0:
        return batch
    padding = np.zeros((missing,) + batch.shape[1:], dtype=batch.dtype)
    padding[..., 1:] = IGNORED_TARGET
    return np.concatenate([batch, padding])


def validation_loss(model: nn.Module, cfg: TrainArgs, env: DistributedEnv, mesh: DeviceMesh | None) -> dict[str, float]:
    """Mean token loss on each source's val shards (`val/<source>/loss`) and over all (`val/loss`).

    Data-parallel ranks read disjoint val lines; every rank runs the same number of batches (the
    smallest count) of the same shape (a short last batch is padded with ignored rows), since
    sharded and memory-parallel forwards are collectives."""
    batch_size = cfg.validation.batch_size or cfg.data.batch_size
    max_batches = cfg.validation.max_batches if cfg.validation.max_batches > 0 else None
    dp_rank, dp_size = dp_rank_and_size(mesh)
    dtype = autocast_dtype(cfg.distributed.model_dtype)
    results: dict[str, float] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for source in sorted(cfg.data.sources):
            batches = list(iter_validation_batches(cfg.data, source, batch_size, max_batches, dp_rank, dp_size))
            count = torch.tensor([float(len(batches))], device=env.device)
            if mesh is not None:
                dist.all_reduce(count, op=dist.ReduceOp.MIN)
            losses = []
            for batch in batches[: int(count.item())]:
                inputs, targets = _to_device(_pad_rows(batch, batch_size), env.device)
                with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
                    losses.append(model(inputs, targets).float())
            if losses:
                results[f"val/{source}/loss"] = dp_mean(torch.stack(losses).mean(), mesh).item()
    if results:
        results["val/loss"] = float(np.mean(list(results.values())))
    model.train(was_training)
    return results


def _restore(state: dict[str, Any], scheduler: Any, data_state: DataLoaderState) -> DataLoaderState:
    """Scheduler and data-loader state from a checkpoint; a data state saved by another data-parallel
    layout cannot continue its stream exactly, so the stream restarts (with a warning)."""
    scheduler.load_state_dict(state["scheduler"])
    saved = DataLoaderState.from_dict(state["data"])
    if (saved.rank, saved.world_size) == (data_state.rank, data_state.world_size):
        return saved
    logger.warning(
        "checkpoint data state is for data-parallel rank %d of %d, this run is rank %d of %d: "
        "model and optimizer resume, the data stream restarts",
        saved.rank, saved.world_size, data_state.rank, data_state.world_size,
    )
    return data_state


def train(cfg: TrainArgs, spec: ModelSpec) -> TrainResult:
    """Run (or resume) training as configured; returns the losses this call logged."""
    env = init_distributed(cfg.distributed)
    _setup_logging(env.rank)
    mesh = build_mesh(cfg.distributed, env)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    # Inputs are checked (tokenizer file, data shards) before anything is written.
    prepare_sources(cfg.data)
    tokenizer = build_tokenizer(cfg.data.tokenizer.name, cfg.data.tokenizer.path, cfg.data.tokenizer.encoding)
    data_state = init_dataloader_state(cfg.data, dp_rank, dp_size)
    dump_dir = Path(cfg.dump_dir)
    checkpoint_dir = Path(cfg.checkpoint.path or dump_dir / "checkpoints")
    checkpoints = CheckpointManager(cfg.checkpoint, checkpoint_dir)
    latest = checkpoints.latest_sound()
    # A rerun is checked against the config its checkpoint was written under before anything is written.
    if latest is not None:
        decision = _decided_on_main(lambda: check_resume(cfg, latest, dump_dir, cfg.checkpoint.force_resume))
        if decision.step >= cfg.steps:
            logger.info(
                "run %s is complete: checkpoint %s is at step %d of steps=%d, nothing to train "
                "(raise steps to continue it, or use another dump_dir for a new run)", cfg.name, latest, decision.step, cfg.steps,
            )
            _end_distributed()
            return TrainResult(step=decision.step, preempted_by=None, losses={}, val_losses={}, skipped_steps=[], dump_dir=dump_dir, last_checkpoint=latest)
    check_writable(dump_dir, "dump_dir")
    if cfg.checkpoint.path:
        check_writable(checkpoint_dir, "checkpoint.path")
    init_ckpt = cfg.checkpoint.init_ckpt_path
    init_weights = resolve_init_weights(init_ckpt) if init_ckpt and latest is None else None  # used only without a checkpoint to resume
    logger.info(
        "run %s: dump_dir %s | metrics %s | config %s | checkpoints %s",
        cfg.name, dump_dir, metric_path(dump_dir), dump_dir / "config.yaml", checkpoint_dir,
    )
    if latest is not None and env.is_main:
        log_resume(decision)
    _seed_everything(cfg.seed + env.rank)

    model = _build_model(cfg, spec, tokenizer, env, mesh)
    groups = spec.param_groups(model, cfg.optim) if spec.param_groups else None
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.steps, groups)
    logger.info("model: %s parameters on %s, world size %d (data-parallel %d)", f"{_count_params(model):,}", env.device, env.world_size, dp_size)

    step = 0
    if latest is not None:
        state = checkpoints.load(latest, model, optimizer)
        step = state["step"]
        data_state = _restore(state, scheduler, data_state)
    elif init_weights is not None:
        load_model_weights(init_weights, model)
        logger.info("initialized weights from %s", init_weights)
    # The run continues: its config is the dump_dir's from here on.
    dump_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        dump_config(cfg, dump_dir / "config.yaml")

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.grad_acc_steps  # per data-parallel rank
    flops_per_gpu_token = spec.flops_per_token(model, cfg.data.seq_len) / cfg.distributed.tp_size
    result = TrainResult(step=step, preempted_by=None, losses={}, val_losses={}, skipped_steps=[], dump_dir=dump_dir, last_checkpoint=latest)
    with contextlib.ExitStack() as stack:
        loop = _Loop(
            cfg=cfg, spec=spec, env=env, mesh=mesh, dp_size=dp_size, model=model, optimizer=optimizer, scheduler=scheduler,
            checkpoints=checkpoints, result=result, tokens_per_step=tokens_per_step, dtype=autocast_dtype(cfg.distributed.model_dtype),
            throughput=Throughput(flops_per_gpu_token, device_peak_flops(cfg.logging.peak_flops)),
            step_rate=RecentStepRate(cfg.steps),  # ETA from the last few logged intervals
            metrics=stack.enter_context(MetricLogger(metric_path(dump_dir), cfg.logging.wandb, cfg.name, to_dict(cfg)) if env.is_main else NullLogger()),
        )
        batches: Iterator = stack.enter_context(build_dataloader(cfg.data, data_state, dp_rank, dp_size))
        profiler = stack.enter_context(maybe_profile(cfg.profiling, dump_dir, start_step=step, rank=env.rank))
        preemption = stack.enter_context(PreemptionWatcher(cfg.preemption_check_every))
        model.train()
        if step == 0:
            _validate(loop, step)
        while step < cfg.steps:
            data_state, step_lr = _optimizer_step(loop, batches, step + 1)
            step += 1
            profiler.step()
            stop_signal = preemption.agreed_signal(env.device, step)
            is_final = step == cfg.steps or stop_signal is not None
            must_save = checkpoints.should_save(step, final=is_final)
            if (step % cfg.logging.freq == 0 or is_final or must_save) and loop.window_norms:
                _log(loop, step, step_lr)
            if cfg.validation.every > 0 and (step % cfg.validation.every == 0 or step == cfg.steps):
                _validate(loop, step)
            if must_save:
                _save(loop, step, data_state)
                _evaluate_if_due(loop, step)
            if stop_signal is not None:
                _stop(loop, step, stop_signal)
                break
    result.step = step
    # Drop what holds process groups (FSDP state, the mesh, the memory layers' node groups) while the
    # groups exist: left to interpreter exit, a group's destruction there can abort the process.
    del loop, model, optimizer, scheduler, groups, mesh
    gc.collect()
    _end_distributed()
    return result


@dataclass
class _Loop:
    """What the training loop's steps share: the run's config and parts, built once by `train`,
    and the loss and gradient-norm window accumulated between two log points."""

    cfg: TrainArgs
    spec: ModelSpec
    env: DistributedEnv
    mesh: DeviceMesh | None
    dp_size: int
    model: nn.Module
    optimizer: Any
    scheduler: Any
    checkpoints: CheckpointManager
    metrics: MetricLogger | NullLogger
    throughput: Throughput
    step_rate: RecentStepRate
    result: TrainResult
    tokens_per_step: int  # per data-parallel rank
    dtype: torch.dtype | None  # autocast dtype; None: no autocast
    window_losses: list[torch.Tensor] = field(default_factory=list)  # per micro-step, on the device
    window_norms: list[torch.Tensor] = field(default_factory=list)  # per applied update, on the device


def _optimizer_step(loop: _Loop, batches: Iterator, step: int) -> tuple[DataLoaderState, float]:
    """Optimizer step `step` (from 1): grad_acc_steps micro-batches forward and backward, gradients
    clipped, the update applied (or dropped on a non-finite loss with on_nonfinite=skip), the
    schedule advanced. Returns the data state after its last batch and the lr of the update."""
    cfg, model, optimizer = loop.cfg, loop.model, loop.optimizer
    set_gradient_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP: sync on the last micro-step only
    for micro_step in range(cfg.grad_acc_steps):
        if set_gradient_sync is not None:
            set_gradient_sync(micro_step == cfg.grad_acc_steps - 1)
        batch, data_state = next(batches)
        inputs, targets = _to_device(batch, loop.env.device)
        with torch.autocast(loop.env.device.type, dtype=loop.dtype, enabled=loop.dtype is not None):
            loss = model(inputs, targets)
        (loss / cfg.grad_acc_steps).backward()
        loop.window_losses.append(loss.detach().float())
    if loop.dp_size > 1:  # FSDP reduced the dense gradients; row-sparse ones (memory values) are averaged here
        all_reduce_row_grads(optimizer, dp_group(loop.mesh))
    grad_norm = clip_gradients(model.parameters(), optimizer, cfg.optim)
    step_lr = loop.scheduler.get_last_lr()[0]  # the lr of this step's update (logged)
    if cfg.on_nonfinite == "skip" and _nonfinite_anywhere(loop.window_losses[-cfg.grad_acc_steps :], grad_norm, loop.mesh):
        del loop.window_losses[-cfg.grad_acc_steps :]  # the step's data is consumed, its update dropped
        loop.result.skipped_steps.append(step)
        logger.warning("step %d: non-finite loss or gradient norm, update skipped (on_nonfinite=skip)", step)
    else:
        loop.window_norms.append(grad_norm.detach().float())
        optimizer.step()
    loop.scheduler.step()  # a skipped update still takes its step of the schedule
    optimizer.zero_grad(set_to_none=True)
    loop.throughput.add_tokens(loop.tokens_per_step)
    return data_state, step_lr


def _log(loop: _Loop, step: int, step_lr: float) -> None:
    """The metrics of the window since the last log point (its finiteness checked first), logged
    at `step`; the window is emptied."""
    cfg, result = loop.cfg, loop.result
    step_losses = dp_mean(torch.stack(loop.window_losses).view(-1, cfg.grad_acc_steps).mean(dim=1), loop.mesh)
    _check_finite(step_losses, loop.window_norms, step)
    record = {
        "step": step,
        "loss": step_losses[-1].item(),
        "grad_norm": loop.window_norms[-1].item(),
        "lr": step_lr,
        "tokens": step * loop.tokens_per_step * loop.dp_size,
        **loop.throughput.measure(),
        **memory_stats(),
        **(loop.spec.log_metrics(loop.model) if loop.spec.log_metrics else {}),
        **({"skipped_steps": len(result.skipped_steps)} if result.skipped_steps else {}),
    }
    result.losses[step] = record["loss"]
    eta = loop.step_rate.eta_s(step)
    loop.metrics.log(record)
    if loop.env.is_main:
        logger.info(progress_line(record, cfg.steps, eta))
    loop.window_losses.clear()
    loop.window_norms.clear()


def _validate(loop: _Loop, step: int) -> None:
    """The validation loss at `step` (when validation.every > 0), kept in the result and logged."""
    if loop.cfg.validation.every <= 0:
        return
    with loop.throughput.excluding("validation"):
        record = validation_loss(loop.model, loop.cfg, loop.env, loop.mesh)
    if "val/loss" in record:
        loop.result.val_losses[step] = record["val/loss"]
        logger.info("step %d validation: %s", step, " ".join(f"{k}={v:.4f}" for k, v in record.items()))
        loop.metrics.log({"step": step, **record})


def _save(loop: _Loop, step: int, data_state: DataLoaderState) -> None:
    """A checkpoint of `step`: model, optimizer, schedule and data state (the result points at it)."""
    train_state = {"scheduler": loop.scheduler.state_dict(), "data": data_state.to_dict()}
    with loop.throughput.excluding("checkpoint"):
        loop.result.last_checkpoint = loop.checkpoints.save(step, loop.model, loop.optimizer, train_state, to_dict(loop.cfg))


def _evaluate_if_due(loop: _Loop, step: int) -> None:
    """The `eval` section on the checkpoint just saved, when `step` is an eval step and the app can evaluate."""
    if loop.checkpoints.is_eval_step(step) and loop.cfg.eval is not None and loop.spec.evaluate is not None:
        with loop.throughput.excluding("eval"):
            record = _evaluate(loop.spec, loop.cfg, loop.result.last_checkpoint, step, loop.env)
        loop.metrics.log({"step": step, **record})


def _stop(loop: _Loop, step: int, stop_signal: int) -> None:
    """A run stopped by a signal at `step` (after its checkpoint): recorded, and requeued under SLURM when the signal asks."""
    result = loop.result
    result.preempted_by = signal.Signals(stop_signal).name
    if loop.env.is_main:
        logger.warning(
            "stopped by %s at step %d: checkpoint %s holds it; the same command resumes from there",
            result.preempted_by, step, result.last_checkpoint,
        )
    if stop_signal in REQUEUE_SIGNALS and loop.env.is_main:
        requeue_slurm_job()


def _decided_on_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0, its outcome (a value, or the exception it raised) handed to every
    rank: all ranks go on, or all raise the same error, before the next collective."""
    outcome: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome[0] = (decide(), None)
        except Exception as error:
            outcome[0] = (None, error)
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def _end_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _evaluate(spec: ModelSpec, cfg: TrainArgs, folder: Path, step: int, env: DistributedEnv) -> dict[str, float]:
    """Evaluate a just-saved checkpoint: in this process (rank 0, the other ranks wait, so
    distributed.timeout_s must cover it), or, under SLURM, as its own job (the app's evaluate
    submits it and returns no metrics; the job appends to metrics.eval.jsonl). The evaluation
    runs on its own RNG state (lm-eval reseeds the global generators, loading the model draws
    from them): training continues with the generators it had, as a resumed run does."""
    record: dict[str, float] = {}
    if env.is_main:
        training_rng = rng_state()
        try:
            record = spec.evaluate(cfg, folder, step)
        finally:
            set_rng_state(training_rng)
    if dist.is_initialized():
        dist.barrier()
    if record:
        logger.info("step %d evaluation: %s", step, " ".join(f"{k}={v:.4f}" for k, v in record.items()))
    return record


def _count_params(model: nn.Module) -> int:
    """Parameters of the whole model (sharded parameters counted at their full size)."""
    return sum(p.numel() for p in model.parameters())


def _nonfinite_anywhere(micro_losses: list[torch.Tensor], grad_norm: torch.Tensor, mesh: DeviceMesh | None) -> bool:
    """Whether any rank's loss or the global gradient norm of this step is NaN/inf (a host sync)."""
    bad = (~torch.isfinite(torch.stack(micro_losses)).all() | ~torch.isfinite(grad_norm)).float()
    return bool(dp_mean(bad, mesh) > 0)


def _check_finite(step_losses: torch.Tensor, norms: list[torch.Tensor], step: int) -> None:
    """Raise naming the first optimizer step whose loss or gradient norm is not finite.

    Losses and norms stay on the device between log points, so the loop has no per-step host
    sync; they are checked (the same on every rank: losses are averaged over data-parallel ranks,
    the norm is global) before anything is logged or saved, so no checkpoint holds the weights of
    a non-finite step.
    """
    finite = torch.isfinite(step_losses) & torch.isfinite(torch.stack(norms))
    if bool(finite.all()):
        return
    first_bad = int((~finite).nonzero()[0])
    bad_step = step - len(norms) + 1 + first_bad
    raise NonFiniteLossError(
        f"non-finite loss or gradient norm at step {bad_step} (loss {float(step_losses[first_bad])}, "
        f"grad norm {float(norms[first_bad])}); the last good checkpoint is kept"
    )
