"""Preemption and Ctrl-C: SIGTERM, SIGUSR1, SIGUSR2 and SIGINT make training save a checkpoint and stop cleanly.

SLURM sends SIGUSR1/SIGUSR2 ahead of a time limit (`--signal`) and SIGTERM on preemption or
cancel; Ctrl-C sends SIGINT. The handler only sets a flag; the trainer checks it after every step
(with several ranks, every `check_every` steps: agreeing costs an all-reduce and a host sync),
saves, and, for a time-limit signal under SLURM, requeues the job so it continues from that
checkpoint. A second Ctrl-C raises KeyboardInterrupt at once (the checkpoint being written, if
any, is left unpublished).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # time limit ahead: save, requeue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # preempted, cancelled or Ctrl-C: save, stop


class PreemptionWatcher:
    """Installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self, check_every: int = 1) -> None:
        self.check_every = check_every  # steps between the ranks' agreements (a single process checks every step)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.received is None:
            again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
            logger.warning("received %s: saving a checkpoint at the end of this step%s", signal.Signals(signum).name, again)
        self.received = signum

    def __enter__(self) -> "PreemptionWatcher":
        for signum in REQUEUE_SIGNALS + STOP_SIGNALS:
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (e.g. in the background): keep it so
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed_signal(self, device: torch.device, step: int) -> int | None:
        """After optimizer step `step`: the signal any rank received, at steps that are multiples of
        check_every (None in between); every rank gets the same answer, so all stop at one step."""
        if not dist.is_initialized():
            return self.received
        if step % self.check_every:
            return None
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (rank 0 only); False when not under SLURM."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return False
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        logger.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    logger.warning("requeued SLURM job %s; it resumes from the checkpoint just saved", job_id)
    return True
