"""Host memory in the metric records: resident set size now and at its peak, on CPU and GPU runs."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from lingua.metrics import host_memory_stats, memory_stats


def test_host_memory_tracks_an_allocation() -> None:
    before = host_memory_stats()
    assert before["memory/host_max_rss_gib"] > 0
    if sys.platform.startswith("linux"):
        assert 0 < before["memory/host_rss_gib"] <= before["memory/host_max_rss_gib"]
    block = mmap.mmap(-1, 64 * 2**20)  # fresh pages (an allocator could reuse freed, still resident memory)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1  # touch every page
    after = host_memory_stats()
    if sys.platform.startswith("linux"):
        assert after["memory/host_rss_gib"] - before["memory/host_rss_gib"] > 48 / 1024
    assert after["memory/host_max_rss_gib"] >= before["memory/host_max_rss_gib"]
    assert after["memory/host_max_rss_gib"] >= after.get("memory/host_rss_gib", 0)
    block.close()


def test_memory_stats_keeps_its_keys_and_adds_host_memory() -> None:
    stats = memory_stats()
    device_keys = {"memory/max_allocated_gib", "memory/max_reserved_gib"} if torch.cuda.is_available() else {"memory/max_rss_gib"}
    assert device_keys <= set(stats)
    assert "memory/host_max_rss_gib" in stats
    if not torch.cuda.is_available():  # both are the process's peak RSS here
        assert stats["memory/max_rss_gib"] == pytest.approx(stats["memory/host_max_rss_gib"], rel=0.05)


def test_throughput_leaves_excluded_time_out() -> None:
    """Validation, saves and evaluation inside `excluding` do not dilute tokens/s; their time is reported apart."""
    import time

    from lingua.metrics import Throughput

    throughput = Throughput(flops_per_token=6.0, peak_flops=None)
    throughput.add_tokens(1000)
    with throughput.excluding("validation"):
        time.sleep(0.3)
    with throughput.excluding("checkpoint"):
        time.sleep(0.1)
    record = throughput.measure()
    assert record["time/validation_s"] >= 0.3 and record["time/checkpoint_s"] >= 0.1
    assert record["speed/tokens_per_s"] > 100 * 1000 / 0.4  # only the instants outside the blocks count
    throughput.add_tokens(1000)
    time.sleep(0.05)
    record = throughput.measure()
    assert "time/validation_s" not in record and record["speed/tokens_per_s"] < 1000 / 0.05
