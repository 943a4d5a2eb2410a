"""What every text generator shares: where a continuation ends given its stop strings. Used by the
apps/main and apps/mosaics generators and by the lm-eval adapter (`lingua.evaluation.lm_eval_adapter`).
"""

from __future__ import annotations

from typing import Sequence


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (empty stop strings are ignored)."""
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
