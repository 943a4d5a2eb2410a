"""Text generation from an apps/main checkpoint with a KV cache.

    python -m apps.main.generate ckpt=runs/debug prompt="Once upon a time" generator.max_gen_len=64

`ckpt` is a run's dump_dir (its newest checkpoint), a checkpoint folder, or a consolidated
folder/file. Prompts of a batch are left-padded so they decode together; each row has its own
RoPE positions and never attends to padding. The prefix is encoded once, then one token per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from apps.main.model import MainTrainArgs, build_model
from apps.main.transformer import LMTransformer
from lingua.args import ConfigError, cli_main
from lingua.checkpoint import load_trained_model
from lingua.generation import cut_at_stops
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class GeneratorArgs:
    RANGES: ClassVar[dict[str, str]] = {"max_gen_len": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "top_k": ">= 1", "seed": ">= 0"}

    max_gen_len: int = 128  # new tokens per prompt at most
    temperature: float = 0.0  # 0: greedy; otherwise sample from softmax(logits / temperature)
    top_p: float | None = None  # nucleus sampling: keep the smallest set of tokens with this much mass
    top_k: int | None = None  # keep the k most likely tokens
    until: list[str] = field(default_factory=list)  # stop a row when its text contains one of these
    seed: int = 0  # sampling seed
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype of the model during generation
    device: Literal["auto", "cpu", "cuda"] = "auto"


def sample_next(logits_BV: torch.Tensor, args: GeneratorArgs, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row [B] from its logits [B, V]."""
    if args.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / args.temperature
    if args.top_k is not None:
        kth = torch.topk(logits, min(args.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if args.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= args.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Batched KV-cache generation for an LMTransformer and its tokenizer."""

    def __init__(self, model: LMTransformer, tokenizer: Tokenizer, args: GeneratorArgs) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = args
        self.device = next(model.parameters()).device
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def _encode(self, prompt: str) -> list[int]:
        """The prompt's tokens; a prompt longer than max_seqlen - max_gen_len keeps its end, with a warning."""
        tokens = self.tokenizer.encode(prompt, add_bos=True)
        budget = self.model.args.max_seqlen - self.args.max_gen_len
        if budget < 1:
            raise ConfigError(f"generator.max_gen_len={self.args.max_gen_len} leaves no room for a prompt in max_seqlen={self.model.args.max_seqlen}")
        if len(tokens) > budget:
            logger.warning(
                "prompt of %d tokens is longer than model.max_seqlen - generator.max_gen_len = %d - %d: the model sees only its last %d tokens: %r",
                len(tokens), self.model.args.max_seqlen, self.args.max_gen_len, budget, self.tokenizer.decode(tokens[-budget:]),
            )
        return tokens[-budget:]

    def prompt_seen(self, prompt: str) -> str:
        """The part of `prompt` the model sees: the whole prompt, or '...' and the end it keeps."""
        budget = self.model.args.max_seqlen - self.args.max_gen_len
        tokens = self.tokenizer.encode(prompt, add_bos=True)
        return prompt if len(tokens) <= budget else "..." + self.tokenizer.decode(tokens[-budget:])

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[str]:
        """The continuation of each prompt (stop strings cut off, EOS ends a row)."""
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        batch, prompt_len = len(encoded), max(len(t) for t in encoded)
        pad_B = torch.tensor([prompt_len - len(t) for t in encoded], device=self.device)
        tokens = torch.zeros(batch, prompt_len, dtype=torch.long, device=self.device)
        for row, ids in enumerate(encoded):
            tokens[row, prompt_len - len(ids) :] = torch.tensor(ids, device=self.device)
        total = prompt_len + self.args.max_gen_len
        caches = self.model.new_kv_caches(batch, total, self.dtype, self.device)
        positions = torch.arange(total, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.args.seed)

        # Prefill: causal over each row's own tokens; a padding query sees only itself (no empty rows).
        query, key = positions[:prompt_len, None], positions[None, :prompt_len]
        mask = (key <= query) & ((key >= pad_B[:, None, None]) | (key == query))
        tok_idx = (positions[:prompt_len][None, :] - pad_B[:, None]).clamp(min=0)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model.forward_cached(tokens, tok_idx, mask.unsqueeze(1), caches, 0)[:, -1]
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(self.args.max_gen_len):
            next_B = sample_next(logits, self.args, generator)
            for row, token in enumerate(next_B.tolist()):
                if done[row]:
                    continue
                if token == self.tokenizer.eos_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                if self.args.until and any(s in self.tokenizer.decode(generated[row]) for s in self.args.until):
                    done[row] = True
            if all(done) or step == self.args.max_gen_len - 1:
                break
            cur = prompt_len + step  # cache position of the token just sampled
            mask = (positions[None, : cur + 1] >= pad_B[:, None]).view(batch, 1, 1, cur + 1)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model.forward_cached(next_B[:, None], (cur - pad_B)[:, None], mask, caches, cur)[:, -1]
        return [cut_at_stops(self.tokenizer.decode(tokens), self.args.until) for tokens in generated]



def load_model_and_tokenizer(ckpt: str, device: str = "auto") -> tuple[LMTransformer, Tokenizer, MainTrainArgs]:
    """The trained model (eval mode, on `device`), its tokenizer and its training config."""
    return load_trained_model(ckpt, MainTrainArgs, build_model, device)


@dataclass
class GenerateArgs:
    ckpt: str = "???"  # run dump_dir, checkpoint folder, or consolidated folder/file
    prompt: str | None = None  # one prompt
    prompts: list[str] = field(default_factory=list)  # or several, generated as one batch
    generator: GeneratorArgs = field(default_factory=GeneratorArgs)


def generate_and_print(args: GenerateArgs, load: Callable[..., tuple], make_generator: Callable[..., Any]) -> list[str]:
    """The generate command of an app: load(ckpt, device) -> (model, tokenizer, cfg), then
    make_generator(model, tokenizer, generator_args).generate(prompts), returned and printed after
    the part of each prompt the model saw (`prompt_seen`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = ([args.prompt] if args.prompt is not None else []) + list(args.prompts)
    if not prompts:
        raise SystemExit('give a prompt: prompt="Once upon a time" (or prompts=[...])')
    model, tokenizer, _ = load(args.ckpt, args.generator.device)
    generator = make_generator(model, tokenizer, args.generator)
    outputs = generator.generate(prompts)
    for prompt, output in zip(prompts, outputs):
        print(f"{generator.prompt_seen(prompt)}{output}\n{'-' * 40}")
    return outputs


def main(args: GenerateArgs) -> list[str]:
    return generate_and_print(args, load_model_and_tokenizer, Generator)


if __name__ == "__main__":
    cli_main(GenerateArgs, main)
