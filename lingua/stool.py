"""SLURM launching through submitit: `python -m lingua.stool script=apps.main.train config=... nodes=2`.

Resolves and validates the run's config before submitting (a dump_dir holding checkpoints takes
only the config changes its resume accepts, lingua.resume), writes it to `<dump_dir>/config.yaml`,
snapshots the code into `<dump_dir>/code` (the job imports it from there, so later edits do not
leak into a running job), and submits one task per GPU. SLURM signals the job `signal_delay_s`
before its time limit; training then saves a checkpoint and requeues itself (lingua.preemption),
and the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lingua.args import ConfigError, cli_main, dump_config, load_config
from lingua.checkpoint import step_dirs
from lingua.resume import check_resume

logger = logging.getLogger(__name__)

CODE_PACKAGES = ("lingua", "apps")  # snapshotted into <dump_dir>/code
CODE_SUFFIXES = (".py", ".yaml")


@dataclass
class StoolArgs:
    RANGES: ClassVar[dict[str, str]] = {"nodes": ">= 1", "ngpus": ">= 0", "ntasks_per_node": ">= 1", "ncpu": ">= 1", "time": ">= 1 or -1", "signal_delay_s": ">= 0"}

    script: str = "apps.main.train"  # module whose `main(cfg)` every task runs
    config: str = "???"  # the run's YAML config
    overrides: list[str] = field(default_factory=list)  # a.b=c overrides of the run's config
    nodes: int = 1  # nodes of the job
    ngpus: int = 8  # GPUs per node, one task each; 0 for a CPU-only job
    ntasks_per_node: int | None = None  # tasks per node; None: ngpus (1 for a CPU-only job)
    ncpu: int = 16  # CPUs per task
    mem: str = ""  # memory per node, e.g. "480G"; empty: the cluster's default
    time: int = -1  # time limit in minutes; -1: the partition's maximum
    partition: str = ""  # SLURM partition; empty: the default one
    qos: str = ""  # SLURM quality of service
    account: str = ""  # SLURM account
    constraint: str = ""  # node features, e.g. "h100"
    exclude: str = ""  # nodes to avoid
    signal_delay_s: int = 120  # the time-limit signal comes this long before the limit: save and requeue
    copy_code: bool = True  # run from a snapshot of the code in <dump_dir>/code
    dry_run: bool = False  # print what would be submitted, submit nothing, write nothing

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.ngpus, 1)


def config_class(script: str) -> type:
    """The config class of an entry point: the annotation of its `main(cfg)` argument."""
    try:
        module = importlib.import_module(script)
    except ImportError as error:
        raise ConfigError(f"script='{script}' cannot be imported: {error}") from None
    main = getattr(module, "main", None)
    hints = typing.get_type_hints(main) if callable(main) else {}
    classes = [hint for name, hint in hints.items() if name != "return"]
    if not classes:
        raise ConfigError(f"script='{script}' has no `main(cfg: ConfigClass)` entry point")
    return classes[0]


def partition_max_minutes(partition: str) -> int | None:
    """The partition's time limit in minutes (None when unlimited or unknown)."""
    command = ["sinfo", "-h", "-o", "%l"] + (["-p", partition] if partition else [])
    try:
        text = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
    if text in ("infinite", "UNLIMITED"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)


def snapshot_code(repo: Path, destination: Path) -> Path:
    """Copy the packages' .py and .yaml files to `destination` (replacing an older snapshot)."""
    if destination.exists():
        shutil.rmtree(destination)
    for package in CODE_PACKAGES:
        for path in (repo / package).rglob("*"):
            if path.is_file() and path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts:
                target = destination / path.relative_to(repo)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return destination


class TrainTask:
    """What every SLURM task runs: the script's main on the dumped config, imported from the code
    snapshot when there is one (the job's working directory stays the submission directory, so
    relative data and tokenizer paths mean what they meant at submission)."""

    def __init__(self, script: str, config_path: str, code_dir: str | None) -> None:
        self.script = script
        self.config_path = config_path
        self.code_dir = code_dir

    def __call__(self) -> Any:
        if self.code_dir is not None:
            sys.path.insert(0, self.code_dir)
            for name in [n for n in sys.modules if n.split(".")[0] in CODE_PACKAGES]:
                del sys.modules[name]  # imported to unpickle this task; re-import from the snapshot
        module = importlib.import_module(self.script)
        print(f"running {self.script} from {module.__file__} with {self.config_path}", flush=True)
        args_module = importlib.import_module("lingua.args")  # the snapshot's
        return module.main(args_module.load_config(config_class(self.script), self.config_path))


def executor_parameters(args: StoolArgs, name: str) -> dict[str, Any]:
    timeout = args.time if args.time > 0 else partition_max_minutes(args.partition)
    params: dict[str, Any] = {
        "name": name,
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.ncpu,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_setup": ["export OMP_NUM_THREADS=1"],
        "slurm_additional_parameters": {"requeue": True},
    }
    if timeout is not None:
        params["timeout_min"] = timeout
    if args.ngpus > 0:
        params["gpus_per_node"] = args.ngpus
    optional = {
        "slurm_partition": args.partition,
        "slurm_qos": args.qos,
        "slurm_account": args.account,
        "slurm_constraint": args.constraint,
        "slurm_exclude": args.exclude,
        "slurm_mem": args.mem,
    }
    params.update({key: value for key, value in optional.items() if value})
    return params


def _check_rerun(cfg: Any, dump_dir: Path) -> None:
    """A dump_dir holding checkpoints gets a rerun of its run: refuse, before config.yaml is
    rewritten, a config the job's resume would refuse (lingua.resume)."""
    checkpoint = getattr(cfg, "checkpoint", None)
    if checkpoint is None:
        return
    folders = step_dirs(Path(checkpoint.path or dump_dir / "checkpoints"))
    if folders:
        check_resume(cfg, folders[-1], dump_dir, checkpoint.force_resume)


def launch(args: StoolArgs) -> str | None:
    """Validate, dump and submit; returns the SLURM job id (None for a dry run)."""
    cfg = load_config(config_class(args.script), args.config, args.overrides)
    dump_dir = Path(cfg.dump_dir).resolve()
    _check_rerun(cfg, dump_dir)
    repo = Path(__file__).resolve().parents[1]
    code_dir = dump_dir / "code" if args.copy_code else None
    params = executor_parameters(args, cfg.name)
    if args.dry_run:
        print(f"would write {dump_dir / 'config.yaml'}" + (f" and snapshot code to {code_dir}" if code_dir else ""))
        print(f"would submit {args.nodes} node(s) x {args.tasks_per_node} task(s) running {args.script}")
        for key, value in params.items():
            print(f"  {key}: {value}")
        return None
    import submitit

    dump_dir.mkdir(parents=True, exist_ok=True)
    config_path = dump_config(cfg, dump_dir / "config.yaml")
    if code_dir is not None:
        snapshot_code(repo, code_dir)
    executor = submitit.AutoExecutor(folder=dump_dir / "submitit", cluster="slurm")
    executor.update_parameters(**params)
    job = executor.submit(TrainTask(args.script, str(config_path), str(code_dir) if code_dir else None))
    print(f"submitted job {job.job_id}: {args.script} with {config_path}")
    print(f"logs: {dump_dir / 'submitit'}/{job.job_id}_0_log.out (.err)")
    return job.job_id


def main(args: StoolArgs) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch(args)


if __name__ == "__main__":
    cli_main(StoolArgs, main, sys.argv[1:], config_key=None)  # `config` is the run's config, a field here
