"""Log-likelihood scoring of token sequences by a logits function, in length-sorted batches, the
windows that score a long text once, and the progress lines of long request lists. The lm-eval
adapter (`lm_eval_adapter.LinguaLM`) answers its loglikelihood requests with these.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

from lingua.metrics import format_duration
from lingua.precision import accumulation_dtype

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, S] (long, on the model's device) -> logits [B, S, V]


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """Windows over s = [BOS] + text (n_tokens text tokens) that score every text token exactly once.

    Each (start, first, end) feeds s[start:end-1] (at most max_length tokens) and scores
    s[first:end]; every window but the first has a full max_length of context."""
    windows = []
    first = 1
    while first <= n_tokens:
        end = min(first + max_length, n_tokens + 1)
        windows.append((max(0, end - 1 - max_length), first, end))
        first = end
    return windows


class Progress:
    """A log line every `every_s` seconds while requests are answered: done / total and the time
    left at the pace so far (`every_s=0`: after every batch), and one when all are done."""

    def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self._start = self._last = time.perf_counter()

    def advance(self, n: int) -> None:
        if n == 0:
            return
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self._last < self.every_s:
            return
        self._last = now
        eta = (now - self._start) / self.done * (self.total - self.done) if self.done else float("nan")
        left = f", eta {format_duration(eta)}" if self.done < self.total else f", took {format_duration(now - self._start)}"
        logger.info("%s: %d/%d done%s", self.what, self.done, self.total, left)


@torch.no_grad()
def score_sequences(
    logits_fn: LogitsFn,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int,
    device: torch.device,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """For each token sequence, the summed log-probability of its last n_scored tokens given all
    tokens before them, and whether each of them is the argmax. Sequences are sorted by length
    and right-padded into batches (causal attention: padding never reaches a real token, and rows
    never see each other); results come back in input order. `progress` counts the sequences."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
    order = sorted((i for i in range(len(sequences)) if n_scored[i] > 0), key=lambda i: -len(sequences[i]))
    if progress is not None:
        progress.advance(len(sequences) - len(order))  # sequences with nothing to score
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = len(sequences[rows[0]]) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        row_idx, pos_idx, targets = [], [], []
        for r, i in enumerate(rows):
            seq, n = sequences[i], n_scored[i]
            if not 0 < n < len(seq):
                raise ValueError(f"sequence {i}: cannot score {n} of its {len(seq)} tokens (the first token has no context)")
            tokens[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            row_idx += [r] * n
            pos_idx += range(len(seq) - 1 - n, len(seq) - 1)  # logits at position p predict token p + 1
            targets += seq[len(seq) - n :]
        logits = logits_fn(tokens.to(device))
        rows_t, pos_t = torch.tensor(row_idx, device=logits.device), torch.tensor(pos_idx, device=logits.device)
        selected = logits[rows_t, pos_t]
        logprobs_NV = selected.to(accumulation_dtype(selected.dtype)).log_softmax(dim=-1)
        target_N = torch.tensor(targets, device=logits.device)
        token_lp = logprobs_NV.gather(1, target_N[:, None]).squeeze(1).double().cpu()
        greedy = (logprobs_NV.argmax(dim=-1) == target_N).cpu()
        row_of = torch.tensor(row_idx)
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, token_lp)
        misses = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, (~greedy).long())
        for r, i in enumerate(rows):
            results[i] = (float(sums[r]), bool(misses[r] == 0))
        if progress is not None:
            progress.advance(len(rows))
    return results
