"""Context extrapolation: validation loss by token position at multiples of the training length.

Any causal model with a `logits(tokens [B, T]) -> [B, T, V]` function plugs in (both apps' models).
`position_losses` is the mean loss of the prediction made at each position of packed validation
windows (the in-context learning curve); `extrapolation` computes it at 1x, 2x, 4x ... the training
length over the same validation tokens at every length, averaged per position bucket, and
`plot_buckets` draws bucket curves with the training length marked. Nothing
here adapts a model to the longer windows: a model whose positions stop at the training length
(RoPE tables) must be loaded with longer tables by its app, same formula, no interpolation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from lingua.args import ConfigError, InputError
from lingua.data import DataArgs, iter_validation_batches
from lingua.evaluation.scoring import LogitsFn


@dataclass
class ExtrapolationArgs:
    RANGES: ClassVar[dict[str, str]] = {"windows": ">= 1", "bucket": ">= 0", "batch_size": ">= 1"}

    factors: list[int] = field(default_factory=lambda: [1, 2, 4])  # window lengths, in multiples of the training data.seq_len
    windows: int = 8  # windows of the longest length per source; a length f times shorter reads f times as many (same tokens)
    bucket: int = 0  # positions per bucket; 0: a quarter of the training length
    batch_size: int = 4  # windows per forward pass
    sources: list[str] = field(default_factory=list)  # validation sources; empty: those of the training config

    def __post_init__(self) -> None:
        if not self.factors or any(f < 1 for f in self.factors) or len(set(self.factors)) != len(self.factors):
            raise ConfigError(f"extrapolation.factors={self.factors}: give distinct multiples >= 1, e.g. [1, 2, 4]")
        self.factors = sorted(self.factors)
        if any(self.factors[-1] % f for f in self.factors):
            raise ConfigError(f"extrapolation.factors={self.factors}: each must divide the largest, so every length reads the same tokens")


@torch.no_grad()
def position_losses(logits_fn: LogitsFn, batches: Iterable[np.ndarray], device: torch.device) -> tuple[np.ndarray, int]:
    """(mean loss at each position (T,) of fp32 token losses, windows seen) over batches [B, T, 2] of (input, target)."""
    total, windows = None, 0
    for batch in batches:
        tokens = torch.from_numpy(batch).to(device)
        logits = logits_fn(tokens[..., 0])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[..., 1].flatten(), reduction="none").view(tokens.shape[:2])
        sums = losses.double().sum(dim=0)  # fp64 sums: the means do not depend on how windows are batched
        total = sums if total is None else total + sums
        windows += losses.shape[0]
    if total is None:
        raise InputError("no validation windows: check the val files (*.val.jsonl) of the sources and the window length")
    return (total / windows).cpu().numpy(), windows


def bucket_means(curve: np.ndarray, width: int) -> list[dict[str, Any]]:
    """[{start, end, loss}] of consecutive position buckets of `width` (the last one may be shorter)."""
    return [{"start": s, "end": min(s + width, len(curve)), "loss": float(curve[s : s + width].mean())} for s in range(0, len(curve), width)]


def extrapolation(logits_fn: LogitsFn, data: DataArgs, args: ExtrapolationArgs, device: torch.device) -> dict[str, Any]:
    """Loss per position bucket at each `args.factors` multiple of data.seq_len (the training length).

    Every length reads the same first windows * longest tokens of each source's validation stream;
    a stream too short for them is refused (fewer tokens at one length would make lengths
    incomparable). Per source and length: the mean loss, the mean over positions at or beyond the
    training length (None at 1x), the buckets and the full curve."""
    train_len = data.seq_len
    width = args.bucket or max(1, train_len // 4)
    longest = train_len * args.factors[-1]
    result: dict[str, Any] = {"train_seq_len": train_len, "bucket": width, "tokens": args.windows * longest, "sources": {}}
    for source in args.sources or sorted(data.sources):
        lengths = []
        for factor in args.factors:
            seq_len = train_len * factor
            wanted = args.windows * longest // seq_len
            batches = iter_validation_batches(dataclasses.replace(data, seq_len=seq_len), source, args.batch_size, -(-wanted // args.batch_size))
            curve, windows = position_losses(logits_fn, _first_windows(batches, wanted), device)
            if windows < wanted:
                raise InputError(
                    f"source '{source}': its validation files hold {windows} windows of {seq_len} tokens, {wanted} needed; "
                    f"lower extrapolation.windows (now {args.windows}) or the largest factor"
                )
            lengths.append({
                "factor": factor,
                "seq_len": seq_len,
                "windows": windows,
                "loss": float(curve.mean()),
                "loss_beyond_train": float(curve[train_len:].mean()) if seq_len > train_len else None,
                "buckets": bucket_means(curve, width),
                "loss_by_position": curve.tolist(),
            })
        result["sources"][source] = lengths
    return result


def _first_windows(batches: Iterable[np.ndarray], n: int) -> Iterable[np.ndarray]:
    """The batches cut to their first n windows in all."""
    for batch in batches:
        if n <= 0:
            return
        yield batch[:n]
        n -= len(batch)


def plot_buckets(curves: dict[str, list[dict[str, Any]]], train_lens: set[int], path: Path, title: str = "") -> None:
    """Bucket losses against position, one line per label, each training length dashed."""
    from lingua.plot import plt, save_figure

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, buckets in curves.items():
        axes.plot([(b["start"] + b["end"] - 1) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o", label=label)
    for train_len in sorted(train_lens):
        axes.axvline(train_len - 0.5, color="grey", linestyle="--", label=f"training length {train_len}")
    save_figure(figure, axes, path, "token position in the window (bucket middle)", "validation loss", title)
