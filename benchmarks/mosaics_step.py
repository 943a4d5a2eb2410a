"""Training-step throughput and peak memory of the 12-layer Memory Mosaics model, eager and compiled.

    python -m benchmarks.mosaics_step                      # 12L/768, 512 x 8 and 2048 x 2, bf16 (GPU)
    python -m benchmarks.mosaics_step --tiny               # a small model on CPU

A step is forward + backward + clipping + AdamW on random tokens. The reference formulation is the
same model with the naive (T x T weights) leaky average, the public "regular" version's approach;
ours uses the leaky-average custom op (Triton on GPU). Both get the same weights and must give the
same loss first (the parity gate). The public implementation's best,
measured on one H100: 47.4 ms / 10.1 GB at 512 x 8, 76.9 ms / 22.0 GB at 2048 x 2 (its CUDA version: 8.5 / 11.5 GB).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from apps.mosaics.train import MosaicsTrainArgs
from benchmarks.timing import format_table, full_size_needs_gpu, time_fn, training_step
from lingua.args import load_config
from lingua.mosaics.model import MosaicsArgs, MosaicsLM
from lingua.optim import OptimArgs, build_optimizer


def build(args: MosaicsArgs, device: torch.device) -> MosaicsLM:
    with torch.device("meta"):
        model = MosaicsLM(args)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="apps/mosaics/configs/babistories_12l.yaml")
    parser.add_argument("--tiny", action="store_true", help="a small model on CPU")
    parser.add_argument("--shapes", nargs="+", default=["8x512", "2x2048"], help="batch x seq_len")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    cli = parser.parse_args()
    full_size_needs_gpu(cli.tiny, "benchmarks.mosaics_step")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cli.tiny:
        model_args = MosaicsArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, pmem_size=224)
        shapes = [(2, 64)]
    else:
        model_args = dataclasses.replace(load_config(MosaicsTrainArgs, cli.config).model, vocab_size=cli.vocab)
        shapes = [tuple(int(v) for v in s.split("x")) for s in cli.shapes]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = [False] + ([True] if device.type == "cuda" and not cli.no_compile else [])
    reference_args = dataclasses.replace(model_args, leaky_impl="naive")
    ours, reference = build(model_args, device), build(reference_args, device)
    reference.load_state_dict(ours.state_dict())

    tokens = torch.randint(0, model_args.vocab_size, (1, 65), device=device)
    with torch.no_grad():  # the parity gate, in fp32 and eval mode (no dropout)
        ours.eval(), reference.eval()
        torch.testing.assert_close(ours(tokens[:, :-1], tokens[:, 1:]), reference(tokens[:, :-1], tokens[:, 1:]), rtol=1e-4, atol=1e-4)
        ours.train(), reference.train()
    print("parity: same loss with the naive and the fast leaky average")

    for batch, seq in shapes:
        tokens = torch.randint(0, model_args.vocab_size, (batch, seq + 1), device=device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        timings, notes = [], {}
        for compiled in modes:
            for label, model in (("naive leaky (reference)", reference), ("ours", ours)):
                name = f"{label}{', compiled' if compiled else ''}"
                optimizer, _ = build_optimizer(model, OptimArgs(lr=1e-4, warmup=0), n_steps=1000)
                forward = torch.compile(model) if compiled else model
                step = training_step(forward, model, optimizer, inputs, targets, dtype)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timing = time_fn(name, step, cli.warmup, cli.repeats)
                timings.append(timing)
                peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
                notes[name] = f"{batch * seq / (timing.median_ms / 1e3):,.0f} tok/s{peak}"
                del optimizer
        print(f"\n### {model_args.n_layers}L/{model_args.dim}, batch {batch} x seq {seq}, {dtype}")
        print(format_table(timings, reference="naive leaky (reference)", extra=notes))


if __name__ == "__main__":
    main()
