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
