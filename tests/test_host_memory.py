"""Host memory of zero-copy tables shared by a node's ranks: the node is found through the
shared-memory mount, not the host name (2 gloo ranks under torchrun, `worker()` holds the checks);
a shared file's space is reserved when it is created and a full mount is refused in one line; under
SLURM the tasks on this node decide whether the capacity check counts the shared-memory mount, and
the job's check agrees with each table's."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def worker(scratch: Path) -> None:
    from lingua.product_key.zero_copy import host

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    host.SHM_DIR = str(scratch / "common")  # one machine: both ranks see one mount
    memory = host.HostMemory(share_with_node=True)
    assert (memory.local_rank, memory.local_size) == (rank, 2)
    table = memory.zeros((4, 3))
    if rank == 0:
        table.fill_(7.0)
    memory.barrier()
    assert table.eq(7.0).all(), "the ranks of one node map one table"
    # Two machines with the same host name: each rank has a mount of its own.
    host.SHM_DIR = str(scratch / f"machine{rank}")
    alone = host.HostMemory(share_with_node=True)
    assert (alone.local_rank, alone.local_size) == (0, 1), "ranks that cannot see each other's memory must not share a table"
    assert os.listdir(scratch / "common") == [] and os.listdir(scratch / f"machine{rank}") == []  # no probe or table file left
    print(f"rank {rank}: node found through shared memory", flush=True)
    dist.destroy_process_group()


def test_ranks_share_a_table_when_they_share_memory_not_a_host_name(tmp_path):
    for name in ("common", "machine0", "machine1"):
        (tmp_path / name).mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert all(f"rank {rank}: node found through shared memory" in result.stdout for rank in (0, 1))


def first_rank_of_two(monkeypatch, shm_dir: Path):
    """A HostMemory acting as the first of a node's two ranks (no process group: nobody to tell)."""
    from lingua.product_key.zero_copy import host

    monkeypatch.setattr(host, "SHM_DIR", str(shm_dir))
    memory = host.HostMemory()
    memory.local_size = 2
    return memory


def test_shared_tables_reserve_their_space_and_a_full_mount_is_refused(monkeypatch, tmp_path):
    from lingua.args import ConfigError

    reserved: list[int] = []
    real_fallocate = os.posix_fallocate

    def record(descriptor: int, offset: int, length: int) -> None:
        reserved.append(length)
        real_fallocate(descriptor, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", record)
    memory = first_rank_of_two(monkeypatch, tmp_path)
    table = memory.zeros((8, 4))
    assert reserved == [8 * 4 * 4] and table.shape == (8, 4) and table.eq(0).all()

    def no_space(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ConfigError, match=rf"needs 2\.00 GiB in {tmp_path}, which has .* GiB free \(No space left on device\)"):
        memory.zeros((2**27, 4))
    assert list(tmp_path.iterdir()) == []


def small_zero_copy_job(tmp_path: Path):
    """The config of a tiny apps.main training job with one zero-copy memory layer."""
    from apps.main.train import MainTrainArgs
    from lingua.args import config_from_dict

    return config_from_dict(MainTrainArgs, {
        "dump_dir": str(tmp_path / "run"),
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2,
                  "productkey_args": {"is_enabled": True, "layers": "1", "mem_n_keys": 8, "mem_k_dim": 8, "mem_knn": 4, "zero_copy": True}},
    })


def record_capacity_checks(monkeypatch) -> list[bool]:
    """The `shared` argument of every host capacity check from now on (each finds room)."""
    from lingua.product_key.zero_copy import host

    asked: list[bool] = []
    monkeypatch.setattr(host, "available_host_bytes", lambda shared: asked.append(shared) or 2**40)
    return asked


@pytest.mark.parametrize("tasks,node,expected", [("2(x2)", 1, 2), ("4,1", 1, 1), ("3", 0, 3)])
def test_slurm_tasks_on_this_node_decide_the_shared_capacity_check(tasks, node, expected, monkeypatch, tmp_path):
    from apps.main.train import check_host_memory
    from lingua.distributed import local_world_size

    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NODEID", str(node))
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", tasks)
    assert local_world_size() == expected
    asked = record_capacity_checks(monkeypatch)
    check_host_memory(small_zero_copy_job(tmp_path))
    assert asked == [expected > 1]


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_job_and_each_table_check_host_memory_by_one_rule(ranks, monkeypatch, tmp_path):
    """The job's check before training and each table's check when the trainer allocates it
    (share_with_node=True) ask the same thing: one copy, with the shared-memory mount counted
    exactly when the node's ranks map it together."""
    from apps.main.train import check_host_memory
    from lingua.product_key.zero_copy import host, values

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setattr(host, "SHM_DIR", str(tmp_path))

    class FirstRankOfNode(host.HostMemory):
        """The first of this node's ranks, without a process group (nobody to tell)."""

        def __init__(self, share_with_node: bool = False) -> None:
            super().__init__()
            self.local_size = ranks if share_with_node else 1

    monkeypatch.setattr(values, "HostMemory", FirstRankOfNode)
    asked = record_capacity_checks(monkeypatch)
    check_host_memory(small_zero_copy_job(tmp_path))
    values.ZeroCopyValues(64, 32, None, 0.0, "lazy", True).materialize(share_with_node=True)
    assert asked == [ranks > 1, ranks > 1]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))
