"""Text generation from an apps/mosaics checkpoint with the recurrent state (no prefix recomputation).

    python -m apps.mosaics.generate ckpt=runs/mosaics_debug prompt="Once upon a time" generator.max_gen_len=64

Each block keeps an O(1) leaky-average state and a key/value cache whose values join one step late
(value j needs token j + v_shift); each new token costs one step of every block. Prompts are
decoded one row at a time (rows of different lengths would need per-row leaky states anyway).
`load_model_and_tokenizer` is also what evaluation adapters use (`model.logits(tokens)`).
"""

from __future__ import annotations

import logging

import torch

from apps.main.generate import GenerateArgs, GeneratorArgs, generate_and_print, sample_next
from apps.mosaics.train import MosaicsTrainArgs, build_model
from lingua.args import cli_main
from lingua.checkpoint import load_trained_model
from lingua.generation import cut_at_stops
from lingua.mosaics.model import MosaicsLM
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def load_model_and_tokenizer(ckpt: str, device: str = "auto") -> tuple[MosaicsLM, Tokenizer, MosaicsTrainArgs]:
    """The trained model (eval mode, on `device`), its tokenizer and its training config."""
    return load_trained_model(ckpt, MosaicsTrainArgs, build_model, device)


@torch.no_grad()
def generate_tokens(
    model: MosaicsLM, prompt: list[int], args: GeneratorArgs, generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> tuple[list[int], torch.Tensor]:
    """(new tokens, their logits (n, V)) after `prompt` (>= 1 token), one recurrent step per token."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token (e.g. BOS)")
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    state = model.initial_state(1, device, dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for token in prompt:
            logits, state = model.step(torch.tensor([token], device=device), state)
        tokens: list[int] = []
        all_logits = []
        for _ in range(args.max_gen_len):
            all_logits.append(logits[0].float())
            next_token = int(sample_next(logits, args, generator)[0])
            if next_token == stop_id:
                break
            tokens.append(next_token)
            if len(tokens) == args.max_gen_len:
                break
            logits, state = model.step(torch.tensor([next_token], device=device), state)
    return tokens, torch.stack(all_logits)


class MosaicsGenerator:
    """Prompts -> continuations for a MosaicsLM and its tokenizer."""

    def __init__(self, model: MosaicsLM, tokenizer: Tokenizer, args: GeneratorArgs) -> None:
        self.model, self.tokenizer, self.args = model.eval(), tokenizer, args
        self.device = next(model.parameters()).device

    def prompt_seen(self, prompt: str) -> str:
        """The model has no length limit: it always sees the whole prompt."""
        return prompt

    def generate(self, prompts: list[str]) -> list[str]:
        generator = torch.Generator(device=self.device).manual_seed(self.args.seed)
        outputs = []
        for prompt in prompts:
            prompt_tokens = self.tokenizer.encode(prompt, add_bos=True)
            tokens, _ = generate_tokens(self.model, prompt_tokens, self.args, generator, self.tokenizer.eos_id)
            outputs.append(cut_at_stops(self.tokenizer.decode(tokens), self.args.until))
        return outputs


def main(args: GenerateArgs) -> list[str]:
    return generate_and_print(args, load_model_and_tokenizer, MosaicsGenerator)


if __name__ == "__main__":
    cli_main(GenerateArgs, main)
