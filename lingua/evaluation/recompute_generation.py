"""Generation for the lm-eval adapter's generate_until requests: the options one group of requests
asks for, the generate-function type, and `generate_by_recompute`, a generate function for any
model with a logits function (no KV cache). Apps with a cached generator pass their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lingua.evaluation.scoring import LogitsFn
from lingua.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationOptions:
    """What one group of generate_until requests asks for."""

    until: tuple[str, ...] = ()  # stop strings (EOS always stops)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None


GenerateFn = Callable[[list[str], GenerationOptions], list[str]]  # prompts -> continuations


def generate_by_recompute(logits_fn: LogitsFn, tokenizer: Tokenizer, max_length: int, device: torch.device, seed: int = 0) -> GenerateFn:
    """A generate function for any model with a logits function (no KV cache: each step recomputes
    the last max_length tokens of every row): greedy at options.temperature 0, sampled above it."""

    @torch.no_grad()
    def generate(prompts: list[str], options: GenerationOptions) -> list[str]:
        rows = [tokenizer.encode(p, add_bos=True) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        rng = torch.Generator().manual_seed(seed)
        for _ in range(options.max_new_tokens):
            if not live:
                break
            inputs = [(rows[i] + new[i])[-max_length:] for i in live]
            tokens = torch.zeros(len(live), max(len(t) for t in inputs), dtype=torch.long)
            for r, t in enumerate(inputs):
                tokens[r, : len(t)] = torch.tensor(t)
            logits = logits_fn(tokens.to(device))
            last = logits[torch.arange(len(live)), torch.tensor([len(t) - 1 for t in inputs])].float().cpu()
            if options.temperature > 0:
                next_tokens = torch.multinomial(torch.softmax(last / options.temperature, -1), 1, generator=rng)[:, 0]
            else:
                next_tokens = last.argmax(dim=-1)
            still = []
            for i, token in zip(live, next_tokens.tolist()):
                if token == tokenizer.eos_id:
                    continue
                new[i].append(token)
                if not any(s in tokenizer.decode(new[i]) for s in options.until):
                    still.append(i)
            live = still
        return [tokenizer.decode(t) for t in new]

    return generate
