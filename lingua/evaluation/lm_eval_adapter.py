"""`LinguaLM`, the lm-eval model both apps evaluate through: a tokenizer and a logits function
(plus, optionally, a generate function) are all it needs, so any causal model plugs in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import LM

from lingua.evaluation.recompute_generation import GenerateFn, GenerationOptions, generate_by_recompute
from lingua.evaluation.scoring import LogitsFn, Progress, rolling_windows, score_sequences
from lingua.generation import cut_at_stops
from lingua.tokenizer import Tokenizer


class LinguaLM(LM):
    """lm-eval model over a tokenizer and a logits function.

    loglikelihood scores every continuation token (the first included) given BOS + context,
    keeping the last max_length + 1 tokens when the pair is longer; loglikelihood_rolling scores
    every token of a text once, in windows of max_length; generate_until calls `generate_fn`
    (default: `generate_by_recompute`) per group of equal generation options. Requests are batched by
    length and answered in request order. One process: lm-eval's rank is 0, world size 1.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        logits_fn: LogitsFn,
        max_length: int,
        device: torch.device | str = "cpu",
        generate_fn: GenerateFn | None = None,
        batch_size: int = 8,
        max_gen_toks: int = 128,
        progress_every_s: float = 10.0,
    ) -> None:
        super().__init__()
        if max_length < 1 or batch_size < 1 or max_gen_toks < 1:
            raise ValueError(f"max_length={max_length}, batch_size={batch_size}, max_gen_toks={max_gen_toks} must all be >= 1")
        self.tokenizer = tokenizer
        self.logits_fn = logits_fn
        self.max_length = max_length
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.progress_every_s = progress_every_s  # how often a progress line is logged
        self.generate_fn = generate_fn or generate_by_recompute(logits_fn, tokenizer, max_length, self._device)

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], int]:
        """BOS + context + continuation tokens (left-truncated to max_length + 1) and the number of
        continuation tokens. Trailing spaces of the context move to the continuation, and the
        continuation's tokens are those of the joined text after the context's (lm-eval's convention)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_tokens = self.tokenizer.encode(context, add_bos=True)
        whole = self.tokenizer.encode(context + continuation, add_bos=True)
        continuation_tokens = whole[len(context_tokens) :]
        if len(continuation_tokens) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation_tokens)} tokens does not fit the model's {self.max_length} positions"
            )
        sequence = (context_tokens + continuation_tokens)[-(self.max_length + 1) :]
        return sequence, len(continuation_tokens)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._pair_tokens(*request.args) for request in requests]
        progress = Progress("loglikelihood requests", len(pairs), self.progress_every_s)
        results = score_sequences(self.logits_fn, [p[0] for p in pairs], [p[1] for p in pairs], self.batch_size, self._device, progress)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        sequences, n_scored, owner = [], [], []
        for k, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0], add_bos=True)
            for start, first, end in rolling_windows(len(tokens) - 1, self.max_length):
                sequences.append(tokens[start:end])
                n_scored.append(end - first)
                owner.append(k)
        totals = [0.0] * len(requests)
        progress = Progress(f"loglikelihood_rolling windows ({len(requests)} texts)", len(sequences), self.progress_every_s)
        for k, (logprob, _) in zip(owner, score_sequences(self.logits_fn, sequences, n_scored, self.batch_size, self._device, progress)):
            totals[k] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _options(self, gen_kwargs: dict[str, Any]) -> GenerationOptions:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = bool(gen_kwargs.get("do_sample", False))  # lm-eval's tasks decode greedily unless they say so
        return GenerationOptions(
            until=until,
            max_new_tokens=min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=gen_kwargs.get("top_p"),
            top_k=gen_kwargs.get("top_k"),
        )

    def generate_until(self, requests: list[Any]) -> list[str]:
        groups: dict[GenerationOptions, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[self._options(request.args[1])].append(i)
        outputs = [""] * len(requests)
        progress = Progress("generate_until requests", len(requests), self.progress_every_s)
        for options, members in groups.items():
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b : b + self.batch_size]
                texts = self.generate_fn([requests[i].args[0] for i in batch], options)
                for i, text in zip(batch, texts):
                    outputs[i] = cut_at_stops(text, options.until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
                progress.advance(len(batch))
        return outputs
