"""The gated time-variant key scan of Memory Mosaics v2.

naive.py holds the explicit loop over time every faster form is tested against.
"""

from lingua.mosaics.gated_scan.naive import gated_key_scan_naive, gated_key_step, unit_key

__all__ = ["gated_key_scan_naive", "gated_key_step", "unit_key"]
