"""The shared benchmark timing helper: medians, ratios against the named reference."""

import time

import pytest

from benchmarks.timing import Timing, format_table, time_fn


def test_time_fn_measures_and_counts_calls():
    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    timing = time_fn("sleep", sleep_2ms, warmup=2, repeats=5)
    assert len(calls) == 7
    assert 1.9 <= timing.median_ms < 50
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_format_table_ratios():
    timings = [Timing("ref", 10.0, 9.0, 11.0, 5), Timing("ours", 2.5, 2.4, 2.6, 5)]
    table = format_table(timings, reference="ref", extra={"ours": "row-sparse"})
    assert "| ours | 2.500 | 2.400-2.600 | 4.00x | row-sparse |" in table
    assert "| ref | 10.000 | 9.000-11.000 | 1.00x |" in table
    assert "device:" in table and "torch" in table
    with pytest.raises(ValueError, match="missing"):
        format_table(timings, reference="missing")
