"""Training-step throughput of the dense LM: ours vs a bare single-file Llama of the same shape.

    python -m benchmarks.dense_step                      # dense_373m at seq 4096, bf16, compiled (GPU)
    python -m benchmarks.dense_step --tiny               # a small shape that runs on CPU in seconds

A step is forward + backward + clipping + AdamW on random tokens. The reference is a minimal
Llama written out in this file (plain modules, SDPA, fused AdamW); it first gets our weights and
must give the same loss (the parity gate), then both are timed in the same run. Prints tokens/s
and MFU (dense FLOPs only) for each, with the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from apps.main.train import MainTrainArgs, build_model, model_flops_per_token
from apps.main.transformer import LMTransformerArgs
from benchmarks.timing import format_table, full_size_needs_gpu, time_fn, training_step
from lingua.args import load_config
from lingua.metrics import device_peak_flops
from lingua.optim import OptimArgs, build_optimizer
from lingua.tokenizer import ByteTokenizer
from lingua.transformer import ffn_hidden_dim

# ---------------------------------------------------------------------------------------------
# The reference: a bare Llama with the same parameter names and math as LMTransformer.


class BareNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class BareBlock(nn.Module):
    def __init__(self, args: LMTransformerArgs) -> None:
        super().__init__()
        head_dim, hidden = args.resolved_head_dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.resolved_n_kv_heads, head_dim
        self.attention = nn.ModuleDict(
            {
                "wq": nn.Linear(args.dim, args.n_heads * head_dim, bias=False),
                "wk": nn.Linear(args.dim, self.n_kv_heads * head_dim, bias=False),
                "wv": nn.Linear(args.dim, self.n_kv_heads * head_dim, bias=False),
                "wo": nn.Linear(args.n_heads * head_dim, args.dim, bias=False),
            }
        )
        self.feed_forward = nn.ModuleDict(
            {n: nn.Linear(*shape, bias=False) for n, shape in (("w1", (args.dim, hidden)), ("w3", (args.dim, hidden)), ("w2", (hidden, args.dim)))}
        )
        self.attention_norm = BareNorm(args.dim, args.norm_eps)
        self.ffn_norm = BareNorm(args.dim, args.norm_eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.float().unflatten(-1, (-1, 2))
        even, odd = x[..., 0], x[..., 1]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.attention
        h = self.attention_norm(x)
        q = a["wq"](h).unflatten(-1, (self.n_heads, self.head_dim))
        k = a["wk"](h).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = a["wv"](h).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = self._rope(q, cos, sin).type_as(v), self._rope(k, cos, sin).type_as(v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads
        )
        x = x + a["wo"](out.transpose(1, 2).flatten(-2))
        f = self.feed_forward
        h = self.ffn_norm(x)
        return x + f["w2"](F.silu(f["w1"](h)) * f["w3"](h))


class BareLlama(nn.Module):
    def __init__(self, args: LMTransformerArgs) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(BareBlock(args) for _ in range(args.n_layers))
        self.norm = BareNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        head_dim = args.resolved_head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(args.max_seqlen).float(), freqs)
        self.register_buffer("cos", angles.cos()[:, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:seqlen], self.sin[:seqlen])
        x = self.norm(x)
        return F.cross_entropy(self.output(x).flatten(0, 1).float(), target.flatten())


# ---------------------------------------------------------------------------------------------


def _tiny_args() -> tuple[LMTransformerArgs, int, int]:
    return LMTransformerArgs(dim=128, n_layers=2, n_heads=4, max_seqlen=256, multiple_of=64), 4, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="apps/main/configs/dense_373m.yaml")
    parser.add_argument("--tiny", action="store_true", help="a small shape for CPU")
    parser.add_argument("--batch-size", type=int, help="override the config's data.batch_size")
    parser.add_argument("--seq-len", type=int, help="override the config's data.seq_len")
    parser.add_argument("--vocab", type=int, default=32_000, help="vocabulary size (llama2: 32000)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    full_size_needs_gpu(args.tiny, "benchmarks.dense_step")

    if args.tiny:
        model_args, batch, seq = _tiny_args()
        vocab = ByteTokenizer().n_words
    else:
        cfg = load_config(MainTrainArgs, args.config)
        model_args, batch, seq, vocab = cfg.model, cfg.data.batch_size, cfg.data.seq_len, args.vocab
    batch, seq = args.batch_size or batch, args.seq_len or seq
    model_args = dataclasses.replace(model_args, vocab_size=vocab, max_seqlen=max(model_args.max_seqlen, seq))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_models = not args.no_compile and device.type == "cuda"

    tokenizer = ByteTokenizer()
    with torch.device("meta"):
        ours = build_model(model_args, tokenizer)
    ours = ours.to_empty(device=device)
    torch.manual_seed(0)
    ours.init_weights()
    reference = BareLlama(model_args).to(device)
    reference.load_state_dict(ours.state_dict(), strict=True)

    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():  # the parity gate, in fp32
        torch.testing.assert_close(ours(inputs[:1, :64], targets[:1, :64]), reference(inputs[:1, :64], targets[:1, :64]), rtol=1e-4, atol=1e-4)

    def make_step(model: nn.Module):
        optimizer, _ = build_optimizer(model, OptimArgs(lr=1e-4, warmup=0), n_steps=1000)
        forward = torch.compile(model) if compile_models else model
        return training_step(forward, model, optimizer, inputs, targets, dtype)

    timings = [
        time_fn("bare llama (reference)", make_step(reference), args.warmup, args.repeats),
        time_fn("lingua LMTransformer", make_step(ours), args.warmup, args.repeats),
    ]
    flops = model_flops_per_token(ours, seq)
    peak = device_peak_flops(None)
    notes = {}
    for t in timings:
        tokens_per_s = batch * seq / (t.median_ms / 1e3)
        mfu = f", MFU {100 * tokens_per_s * flops / peak:.1f}%" if peak else ""
        notes[t.name] = f"{tokens_per_s:,.0f} tok/s{mfu}"
    print(f"shape: dim {model_args.dim}, {model_args.n_layers} layers, batch {batch} x seq {seq}, vocab {vocab}, {dtype}, compiled={compile_models}")
    print(format_table(timings, reference="bare llama (reference)", extra=notes))


if __name__ == "__main__":
    main()
