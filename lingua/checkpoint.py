"""Checkpoints: sharded save/load of model, optimizer and train state; atomic publish; keep policy.

Layout: `<path>/<step:010d>/` holds the torch.distributed.checkpoint files of {"model", "optim"},
`train_state_<rank:05d>.json` per rank (step, schedule, data-loader state, RNG states) and
`params.json` (the run's config). A checkpoint is written under `.partial-<step>` and published by
one atomic rename, so a crash mid-save never leaves a partial folder where resume looks.
`python -m lingua.checkpoint consolidate <dir>` writes `consolidated/consolidated.pth` + params.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lingua.args import ConfigError, InputError, RunError, config_from_dict
from lingua.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^\d{10}$")
PARTIAL_PREFIX = ".partial-"
PARAMS_FILE = "params.json"
MANIFEST_FILE = "manifest.json"  # size and sha256 of every other file; written last, before publishing
CONSOLIDATED_DIR = "consolidated"
CONSOLIDATED_FILE = "consolidated.pth"


@dataclass
class SaveEvery:
    RANGES: ClassVar[dict[str, str]] = {"every": ">= 0", "keep": "any"}

    every: int = 0  # save every this many steps (0: never, except the final step for dumps)
    keep: int = 0  # keep the newest this many of these checkpoints (<= 0: keep all)


@dataclass
class CheckpointArgs:
    dump: SaveEvery = field(default_factory=lambda: SaveEvery(every=1000, keep=2))  # resume checkpoints
    eval: SaveEvery = field(default_factory=SaveEvery)  # checkpoints kept for evaluation
    path: str | None = None  # where checkpoints go; None: <dump_dir>/checkpoints
    init_ckpt_path: str | None = None  # start from these weights (model only) when dump_dir has no checkpoint
    force_resume: bool = False  # resume even when the config changes the model, data or optimization of the checkpoint's run (lingua/resume.py: KEY_RULES); without it such a rerun stops, naming each change


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Single-process DCP warns on every call that no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointError(RunError):
    """A checkpoint that cannot be written; the message names the folder and the cause."""


class MissingCheckpointError(InputError):
    """A checkpoint path (ckpt=, checkpoint.init_ckpt_path) that names no checkpoint."""


class CorruptCheckpointError(InputError):
    """A checkpoint whose files do not match its manifest (truncated, altered, missing)."""


class CheckpointMismatchError(InputError):
    """A checkpoint that does not fit the model being trained (another shape or architecture)."""


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _my_share(files: list[Path]) -> list[Path]:
    """Files this rank hashes or verifies: every world-th one, so ranks share the work."""
    return files[_rank() :: _world()]


def write_manifest(folder: Path) -> None:
    """Every rank hashes its share of the folder's files; rank 0 writes the manifest (collective)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    mine = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _my_share(files)}
    if _rank() == 0:
        entries: dict[str, Any] = {}
        for part in _all_gather(mine):
            entries.update(part)
        _write_json(folder / MANIFEST_FILE, {"files": entries})
    else:
        _all_gather(mine)


def verify(folder: Path) -> list[str]:
    """Problems of a checkpoint folder, each naming a file (empty: sound). Collective: ranks
    verify disjoint shares of the files and every rank gets the whole list."""
    manifest_path = folder / MANIFEST_FILE
    try:
        entries = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return [f"{manifest_path}: unreadable manifest ({error})"]
    problems = []
    for name in _my_share(sorted(entries)):
        path, expected = folder / name, entries[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {expected['size']} (truncated?)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{path}: checksum mismatch (corrupted)")
    return sorted(p for part in _all_gather(problems) for p in part)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dirs(path: str | Path) -> list[Path]:
    """Published checkpoint folders under `path`, oldest first."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and current CUDA device) RNG states, JSON-serializable."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _bytes_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_bytes(state["cuda"]))


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run."""

    def __init__(self, args: CheckpointArgs, path: str | Path) -> None:
        self.args = args
        self.path = Path(path)

    def is_eval_step(self, step: int) -> bool:
        return self.args.eval.every > 0 and step % self.args.eval.every == 0

    def should_save(self, step: int, final: bool) -> bool:
        dump_every = self.args.dump.every
        return final or (dump_every > 0 and step % dump_every == 0) or self.is_eval_step(step)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], config: dict[str, Any]) -> Path:
        """Write the checkpoint of `step` and publish it atomically; returns its folder.

        A failed write (disk full, read-only folder) raises CheckpointError and leaves every
        published checkpoint as it was."""
        final_dir = self.path / f"{step:010d}"
        partial = self.path / f"{PARTIAL_PREFIX}{step:010d}"
        try:
            if _rank() == 0:
                if partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)
            _barrier()
            model_state, optim_state = get_state_dict(model, optimizer)
            with _single_process_quiet():
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial), no_dist=not dist.is_initialized())
            state = {"step": step, **train_state, "rng": rng_state()}
            _write_json(partial / f"train_state_{_rank():05d}.json", state)
            _barrier()
            if _rank() == 0:
                _write_json(partial / PARAMS_FILE, config)
            _barrier()
            write_manifest(partial)
            if _rank() == 0:
                if final_dir.exists():  # a re-run of the same step: replace it whole
                    shutil.rmtree(final_dir)
                os.replace(partial, final_dir)
                _fsync_dir(self.path)
        except (OSError, CheckpointException) as error:  # DCP reports a writer's OSError inside a CheckpointException
            cause = _os_error(error)
            if cause is None:
                raise
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self.latest()
            raise CheckpointError(
                f"cannot write checkpoint {final_dir}: {cause.strerror or cause}"
                + (f"; the previous checkpoint {previous} is kept" if previous else "; no earlier checkpoint exists")
            ) from error
        if _rank() == 0:
            self.prune()
        _barrier()
        logger.info("saved checkpoint %s", final_dir)
        return final_dir

    def prune(self) -> None:
        """Keep the newest `dump.keep` and `eval.keep` checkpoints; remove stale partial folders."""
        for stale in self.path.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        folders = step_dirs(self.path)
        evals = [f for f in folders if self.is_eval_step(int(f.name))]
        dumps = [f for f in folders if f not in evals]
        keep: set[Path] = set()
        for group, count in ((dumps, self.args.dump.keep), (evals, self.args.eval.keep)):
            keep.update(group if count <= 0 else group[-count:])
        for folder in folders:
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def latest(self) -> Path | None:
        folders = step_dirs(self.path)
        return folders[-1] if folders else None

    def latest_sound(self) -> Path | None:
        """The newest checkpoint that verifies against its manifest; corrupt newer ones are
        reported (naming the file) and skipped. Raises when checkpoints exist but none is sound,
        rather than silently starting over."""
        folders = step_dirs(self.path)
        for folder in reversed(folders):
            problems = verify(folder)
            if not problems:
                return folder
            logger.error("checkpoint %s is not usable, trying an older one: %s", folder, "; ".join(problems))
        if folders:
            raise CorruptCheckpointError(f"no usable checkpoint in {self.path}: every one fails verification (see the errors above)")
        return None

    def load(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and RNG states from `folder`; returns this rank's train state."""
        state_file = folder / f"train_state_{_rank():05d}.json"
        same_layout = state_file.is_file()
        if not same_layout:  # written by fewer ranks: step and schedule are the same on every rank
            state_file = folder / "train_state_00000.json"
            logger.warning("checkpoint %s was written by fewer ranks; rank %d takes rank 0's train state", folder, _rank())
        train_state = json.loads(state_file.read_text())
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
        except (CheckpointException, RuntimeError, ValueError, KeyError) as error:
            raise CheckpointMismatchError(
                f"checkpoint {folder} does not fit this model (another shape or architecture?): {_first_cause(error)}; "
                "use a new dump_dir, or checkpoint.init_ckpt_path for weights of the same shape"
            ) from error
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        rng = train_state.pop("rng")
        if same_layout:
            set_rng_state(rng)
        logger.info("resumed from checkpoint %s (step %d)", folder, train_state["step"])
        return train_state


def resolve_checkpoint(ckpt: str | Path, key: str = "ckpt") -> tuple[Path, Path]:
    """(weights: a checkpoint folder or .pth file, params.json) for a run's dump_dir, a checkpoints
    root (its newest), a checkpoint folder, or a consolidated folder or file. A path that names
    none raises MissingCheckpointError naming `key` and the path."""
    path = Path(ckpt)
    if not path.exists():
        raise MissingCheckpointError(f"{key}='{ckpt}' does not exist; pass a run's dump_dir, a checkpoint folder or a consolidated file")
    if path.is_file():
        return path, path.parent / PARAMS_FILE
    for candidate in (path, path / "checkpoints"):
        folders = step_dirs(candidate)
        if folders:
            path = folders[-1]
            break
    for params in (path / PARAMS_FILE, path / CONSOLIDATED_DIR / PARAMS_FILE):
        if params.is_file():
            return path, params  # load_model_weights prefers a consolidated file inside the folder
    raise MissingCheckpointError(f"{key}='{ckpt}' holds no checkpoint (no {PARAMS_FILE} found); pass a run's dump_dir or a checkpoint folder")


def resolve_init_weights(path: str | Path, key: str = "checkpoint.init_ckpt_path") -> Path:
    """The weights a run starts from: a safetensors model folder (a Hugging Face Llama, a
    `python -m lingua.hf export`) as it is, else what `resolve_checkpoint` finds (a run's dump_dir:
    its newest checkpoint). MissingCheckpointError naming `key` when it names none."""
    from lingua.hf.folders import is_model_folder

    if is_model_folder(Path(path)):
        return Path(path)
    return resolve_checkpoint(path, key)[0]


def check_writable(folder: str | Path, key: str) -> None:
    """ConfigError naming `key` unless files can be created in `folder` (or, while it does not
    exist yet, in its nearest existing parent); writes nothing that stays."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{key}='{folder}' is not usable: {existing} is a file, not a folder; choose another {key}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{key}='{folder}' is not writable: {existing}: {error.strerror or error}; choose another {key}") from None


def load_trained_model(
    ckpt: str | Path, config_class: type, build: Callable[[Any, Tokenizer], torch.nn.Module], device: str = "auto",
    model_overrides: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Tokenizer, Any]:
    """(model in eval mode on `device`, its tokenizer, its training config) from a checkpoint:
    the config from params.json, the model built by the app's `build(model_args, tokenizer)` on
    the meta device, initialized (buffers not in the checkpoint) and loaded. `model_overrides`
    replace model-config fields that shape no weight (e.g. a longer RoPE table for evaluation);
    the returned config stays the training one."""
    weights, params = resolve_checkpoint(ckpt)
    cfg = config_from_dict(config_class, json.loads(params.read_text()), source=str(params))
    tokenizer = build_tokenizer(cfg.data.tokenizer.name, cfg.data.tokenizer.path, cfg.data.tokenizer.encoding)
    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    with torch.device("meta"):
        model = build(dataclasses.replace(cfg.model, **(model_overrides or {})), tokenizer)
    model = model.to_empty(device=target)
    model.init_weights()
    load_model_weights(weights, model)
    return model.eval(), tokenizer, cfg


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load model weights only, from a checkpoint folder (DCP), a consolidated .pth file, or a
    safetensors folder (a Hugging Face Llama or a `python -m lingua.hf export`)."""
    path = Path(path)
    from lingua.hf.folders import is_model_folder, load_folder_weights  # safetensors folders: lingua.hf owns them

    if is_model_folder(path):
        load_folder_weights(path, model)
        return
    if path.is_file():
        # mmap: tensors are read from the file as they are copied in (host tables are never held twice).
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"])
        return
    consolidated = path / CONSOLIDATED_DIR / CONSOLIDATED_FILE
    if consolidated.is_file():
        load_model_weights(consolidated, model)
        return
    if not (path / ".metadata").is_file():
        raise MissingCheckpointError(f"'{path}' is neither a checkpoint folder nor a consolidated .pth file")
    model_state = {k: v for k, v in model.state_dict().items()}
    with _single_process_quiet():
        dcp.load({"model": model_state}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    model.load_state_dict(model_state)


def consolidate(folder: str | Path) -> Path:
    """Gather a sharded checkpoint into `consolidated/consolidated.pth` ({"model": ...}) + params.json."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    out_dir = folder / CONSOLIDATED_DIR
    out_dir.mkdir(exist_ok=True)
    full = out_dir / "full.tmp"
    dcp_to_torch_save(str(folder), str(full))
    state = torch.load(full, map_location="cpu", weights_only=True)
    full.unlink()
    tmp = out_dir / (CONSOLIDATED_FILE + ".tmp")
    torch.save({"model": state["model"]}, tmp)
    os.replace(tmp, out_dir / CONSOLIDATED_FILE)
    if (folder / PARAMS_FILE).is_file():
        shutil.copyfile(folder / PARAMS_FILE, out_dir / PARAMS_FILE)
    return out_dir / CONSOLIDATED_FILE


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write: the error itself, or the first one DCP gathered."""
    if isinstance(error, OSError):
        return error
    failures = error.failures.values() if isinstance(error, CheckpointException) else []
    causes = [failure[0] if isinstance(failure, tuple) else failure for failure in failures]
    return next((cause for cause in causes if isinstance(cause, OSError)), None)


def _first_cause(error: BaseException) -> str:
    """The first line of the underlying error (DCP wraps each rank's failure)."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))  # (exception, traceback frames)
        error = failure[0] if isinstance(failure, tuple) else failure
    return str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate_cmd = commands.add_parser("consolidate", help="gather a checkpoint folder into one .pth file")
    consolidate_cmd.add_argument("folder", help="a checkpoint folder (<dump_dir>/checkpoints/<step>) or a checkpoints root (its newest)")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / ".metadata").is_file():
        newest = step_dirs(folder)
        if not newest:
            parser.error(f"'{folder}' holds no checkpoint")
        folder = newest[-1]
    print(consolidate(folder))


if __name__ == "__main__":
    main()
