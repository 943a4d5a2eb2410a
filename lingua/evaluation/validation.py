"""Validation loss: token-level loss and perplexity of a logits function on each source's val
shards (the `validation` section of an eval).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lingua.data import DataArgs, iter_validation_batches
from lingua.evaluation.config import ValidationEvalArgs
from lingua.evaluation.scoring import LogitsFn


@torch.no_grad()
def validation_metrics(
    logits_fn: LogitsFn, data: DataArgs, args: ValidationEvalArgs, device: torch.device
) -> dict[str, float]:
    """Token-level loss and perplexity on each source's val shards (`val/<source>/loss|ppl|tokens`)
    and over all sources weighted by tokens (`val/loss`, `val/ppl`)."""
    out: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    for source in args.sources or list(data.sources):
        nll, n_tokens = 0.0, 0
        for batch in iter_validation_batches(data, source, args.batch_size, args.max_batches):
            tokens = torch.from_numpy(batch).to(device)
            logits = logits_fn(tokens[..., 0])
            nll += float(F.cross_entropy(logits.flatten(0, 1).float(), tokens[..., 1].flatten(), reduction="sum"))
            n_tokens += tokens[..., 1].numel()
        if n_tokens:
            out.update({f"val/{source}/loss": nll / n_tokens, f"val/{source}/ppl": math.exp(nll / n_tokens), f"val/{source}/tokens": n_tokens})
            total_nll, total_tokens = total_nll + nll, total_tokens + n_tokens
    if total_tokens:
        out.update({"val/loss": total_nll / total_tokens, "val/ppl": math.exp(total_nll / total_tokens)})
    return out
