"""Training-step time of the product-key memory LM vs the dense LM of the same shape.

    python -m benchmarks.pk_model               # GPU: pkplus_373m_1024k vs dense_373m, bf16
    python -m benchmarks.pk_model --tiny        # CPU, small shapes, seconds

A step is forward + backward + clipping + optimizer step (dense AdamW, lazy row updates for the
values) on random tokens. The parity gate: with its memory layers swapped for the dense FFNs
the memory model must be the dense model (same loss from the same weights). The goal on one H100:
memory step time <= 1.15x dense.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn

from apps.main.train import MODEL_SPEC, MainTrainArgs, build_model, model_flops_per_token
from apps.main.transformer import LMTransformerArgs
from benchmarks.timing import format_table, full_size_needs_gpu, time_fn, training_step
from lingua.args import load_config
from lingua.metrics import device_peak_flops
from lingua.optim import OptimArgs, build_optimizer
from lingua.product_key import ProductKeyArgs
from lingua.tokenizer import ByteTokenizer


def _tiny() -> tuple[LMTransformerArgs, LMTransformerArgs, int, int]:
    dense = LMTransformerArgs(dim=64, n_layers=2, n_heads=4, max_seqlen=64, multiple_of=32)
    pk = ProductKeyArgs(is_enabled=True, layers="1", mem_n_keys=32, mem_heads=4, mem_knn=8, mem_k_dim=32)
    return dense, dataclasses.replace(dense, productkey_args=pk), 2, 64


def _build(args: LMTransformerArgs, vocab: int, device: torch.device) -> nn.Module:
    with torch.device("meta"):
        model = build_model(dataclasses.replace(args, vocab_size=vocab), ByteTokenizer())
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def check_parity(dense: nn.Module, memory: nn.Module, tokens: torch.Tensor) -> None:
    """The memory model minus its memory layers is the dense model: copy the shared weights over,
    put the dense FFNs in place of the memory layers, and compare losses."""
    swapped = {name: block.feed_forward for name, block in zip(range(len(memory.layers)), memory.layers)}
    state = {k: v for k, v in dense.state_dict().items()}
    memory_state = memory.state_dict()
    common = {k: v for k, v in state.items() if k in memory_state and memory_state[k].shape == v.shape}
    memory.load_state_dict(common, strict=False)
    try:
        for index, block in enumerate(memory.layers):
            block.feed_forward = dense.layers[index].feed_forward
        with torch.no_grad():
            short = tokens[:1, :32]
            torch.testing.assert_close(memory(short, short), dense(short, short), rtol=1e-4, atol=1e-4)
    finally:
        for index, block in enumerate(memory.layers):
            block.feed_forward = swapped[index]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes for CPU")
    parser.add_argument("--dense-config", default="apps/main/configs/dense_373m.yaml")
    parser.add_argument("--pk-config", default="apps/main/configs/pkplus_373m_1024k.yaml")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    full_size_needs_gpu(args.tiny, "benchmarks.pk_model")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        dense_args, pk_args, batch, seq = _tiny()
        vocab = ByteTokenizer().n_words
    else:
        dense_cfg, pk_cfg = load_config(MainTrainArgs, args.dense_config), load_config(MainTrainArgs, args.pk_config)
        lazy_values = dataclasses.replace(pk_cfg.model.productkey_args, value_update="lazy")  # the config's dense rule rewrites every row
        dense_args, pk_args = dense_cfg.model, dataclasses.replace(pk_cfg.model, productkey_args=lazy_values)
        batch, seq, vocab = pk_cfg.data.batch_size, pk_cfg.data.seq_len, args.vocab
    batch, seq = args.batch_size or batch, args.seq_len or seq
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_blocks = not args.no_compile and device.type == "cuda"

    dense, memory = _build(dense_args, vocab, device), _build(pk_args, vocab, device)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    check_parity(dense, memory, inputs)

    def make_step(model: nn.Module):
        optim_args = OptimArgs(lr=1e-4, warmup=0)
        optimizer, _ = build_optimizer(model, optim_args, 1000, MODEL_SPEC.param_groups(model, optim_args))
        if compile_blocks:  # per block, as the trainer's parallelize does; the bag runs eagerly
            for block in model.layers:
                block.compile()
        return training_step(model, model, optimizer, inputs, targets, dtype)

    timings = [
        time_fn("dense", make_step(dense), args.warmup, args.repeats),
        time_fn("product-key memory", make_step(memory), args.warmup, args.repeats),
    ]
    peak = device_peak_flops(None)
    notes = {}
    for t, model in zip(timings, (dense, memory)):
        tokens_per_s = batch * seq / (t.median_ms / 1e3)
        mfu = f", MFU {100 * tokens_per_s * model_flops_per_token(model, seq) / peak:.1f}%" if peak else ""
        notes[t.name] = f"{tokens_per_s:,.0f} tok/s{mfu}"
    pk = pk_args.productkey_args
    print(
        f"shape: dim {pk_args.dim}, {pk_args.n_layers} layers, memory layers {pk.layers} ({pk.mem_n_keys}^2 x "
        f"{pk.value_dim(pk_args.dim)} values, {pk.mem_heads}x{pk.mem_knn} reads), batch {batch} x seq {seq}, {dtype}, "
        f"compiled blocks={compile_blocks}" + ("; goal (one H100): memory step <= 1.15x dense" if device.type == "cuda" else "")
    )
    print(format_table(timings, reference="dense", extra=notes))


if __name__ == "__main__":
    main()
