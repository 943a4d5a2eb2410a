"""Memory Mosaics v2 benchmarks, one run, ratios printed side by side.

    python -m benchmarks.mosaics_v2                  # GPU: B=4, C=2048, H=16 (v2 small), T = 1024, 4096
    python -m benchmarks.mosaics_v2 --parts block    # one part: scan | block
    python -m benchmarks.mosaics_v2 --tiny           # small shapes on CPU; claims no GPU goal

Part "scan": the gated key scan forward+backward (gradients of x, log_gate and log_decay), ours
(the custom op: Triton on GPU) against the naive loop over time, the chunked torch scan and a plain
`torch.cumsum`-of-logs formulation (one global shift instead of a running max: cheap, but it
underflows over long sequences with strong decays and ignores documents, so the timed inputs use
mild decays). Parity is checked first, each form against the naive loop in fp32 at a small T. The
floor is the bytes the fused forward and backward must move (read x, the gates, the output
gradient; write keys and the three gradients) at the copy rate of this device measured in the
same run. GPU goal: within 3x of that floor.

Part "block": one v2 block (short- and long-term memories, W_o, SwiGLU of width 3C: the v2 small
block) against one Llama block of lingua/transformer.py (causal SDPA attention with RoPE, the same
SwiGLU width) at the same B, T, C, H, forward + backward (gradients of the input and of every
parameter from one output gradient), bf16 autocast on GPU, compiled per block as training does
(--no-compile: eager). The v2 masks and counts, built once per forward and shared by every block,
are timed apart. Parity first: the timed v2 block (op scan; flex_attention on GPU) against the same
weights through the naive scan loop and a dense SDPA mask, in fp32. GPU goal: the v2 block step
within 1.25x of the Llama block's.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.timing import format_table, full_size_needs_gpu, time_fn
from lingua.mosaics.gated_scan import gated_key_scan
from lingua.mosaics.model import MosaicsArgs
from lingua.mosaics.v2 import MosaicsV2Args, MosaicsV2LM
from lingua.transformer import BaseTransformerArgs, FeedForward, RotaryEmbedding, SdpaBackend, TransformerBlock

SCAN_FLOOR_GOAL = 3.0  # ours within this factor of the byte floor (GPU)
BLOCK_RATIO_GOAL = 1.25  # v2 block step time / Llama block step time (GPU)


def cumsum_of_logs(x_BTC: Tensor, log_gate_BTH: Tensor, log_decay_BTH: Tensor, eps: float = 1e-6) -> Tensor:
    """The plain parallel form: kbar_t = exp(A_t) * cumsum_i(exp(g_i - A_i) x_i), A = cumsum(log_decay),
    with one shift per sequence and head so the largest exponent is 0. No documents. (B, T, C)."""
    B, T, C = x_BTC.shape
    H = log_gate_BTH.shape[-1]
    exponent_BTH = log_gate_BTH.float() - log_decay_BTH.float().cumsum(1)
    weight_BTH = torch.exp(exponent_BTH - exponent_BTH.amax(dim=1, keepdim=True))
    s_BTHD = torch.cumsum(weight_BTH[..., None] * x_BTC.float().view(B, T, H, C // H), dim=1)
    return F.normalize(s_BTHD, dim=-1, eps=eps).flatten(2).to(x_BTC.dtype)


def scan_forms() -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    return {
        "naive loop": lambda x, g, d: gated_key_scan(x, g, d, impl="naive"),
        "cumsum of logs": cumsum_of_logs,
        "chunked torch": lambda x, g, d: gated_key_scan(x, g, d, impl="chunked"),
        "ours (op)": lambda x, g, d: gated_key_scan(x, g, d, impl="op"),
    }


def scan_inputs(B: int, T: int, C: int, H: int, x_dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x, log_gate, log_decay requiring grad, and an output gradient; mild decays (see the top)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, device=device).to(x_dtype).requires_grad_()
    log_gate = torch.randn(B, T, H, generator=gen, device=device).requires_grad_()
    log_decay = (-0.01 * torch.randn(B, T, H, generator=gen, device=device).abs()).requires_grad_()
    grad = torch.randn(B, T, C, generator=gen, device=device).to(x_dtype)
    return x, log_gate, log_decay, grad


def check_scan_parity(device: torch.device, heads: int, dim: int) -> None:
    x, g, d, grad = scan_inputs(2, 150, dim, heads, torch.float32, device)
    forms = scan_forms()
    ref = forms["naive loop"](x, g, d)
    ref_grads = torch.autograd.grad(ref, (x, g, d), grad)
    for name, form in forms.items():
        y = form(x, g, d)
        grads = torch.autograd.grad(y, (x, g, d), grad)
        for got, want in zip((y, *grads), (ref, *ref_grads)):
            error = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
            if error > 1e-3:
                raise SystemExit(f"parity gate failed: {name} differs from the naive loop by {error:.2e}")
    print("parity: every form matches the naive loop (fp32, T=150, forward and the three gradients)")


def copy_bytes_per_s(device: torch.device, n_bytes: int) -> float:
    """Measured copy rate (bytes read + written per second) of a buffer of n_bytes."""
    src = torch.empty(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_fn("copy", lambda: dst.copy_(src), warmup=3, repeats=10)
    return 2 * n_bytes / (timing.median_ms / 1e3)


def scan_floor_bytes(x: Tensor, log_gate: Tensor) -> int:
    """Forward: read x and the two gates, write the keys; backward: read the key gradient, x and the
    gates, write dx and the two gate gradients (the chunk states are ignored: T / chunk of x)."""
    features = x.numel() * x.element_size()
    scalars = log_gate.numel() * log_gate.element_size()
    return (2 * features + 2 * scalars) + (3 * features + 4 * scalars)


def bench_scan(args: argparse.Namespace, device: torch.device) -> None:
    x_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_scan_parity(device, args.heads, args.dim)
    rate = copy_bytes_per_s(device, 1 << 30 if device.type == "cuda" else 1 << 24)
    print(f"copy rate of this device (read + write): {rate / 1e9:.1f} GB/s")
    forms = scan_forms()
    for T in args.lengths:
        x, g, d, grad = scan_inputs(args.batch, T, args.dim, args.heads, x_dtype, device)
        floor_ms = scan_floor_bytes(x, g) / rate * 1e3
        timings, notes = [], {}
        for name, form in forms.items():
            if name == "naive loop" and T > args.naive_max_t:
                continue

            def call(form=form) -> None:
                torch.autograd.grad(form(x, g, d), (x, g, d), grad)

            slow = name == "naive loop"
            timing = time_fn(name, call, 1 if slow else args.warmup, 2 if slow else args.repeats)
            timings.append(timing)
            notes[name] = f"{timing.median_ms / floor_ms:.1f}x the byte floor"
        by_name = {t.name: t for t in timings}
        reference = "naive loop" if "naive loop" in by_name else "cumsum of logs"
        ours = by_name["ours (op)"].median_ms
        notes["ours (op)"] += f", speedup vs cumsum of logs {by_name['cumsum of logs'].median_ms / ours:.2f}x"
        print(f"\n### gated key scan forward+backward: B={args.batch} T={T} C={args.dim} H={args.heads} "
              f"x {x_dtype}, gates float32; byte floor {floor_ms:.3f} ms")
        print(format_table(timings, reference=reference, extra=notes))
        if device.type == "cuda":
            ratio = ours / floor_ms
            verdict = "met" if ratio <= SCAN_FLOOR_GOAL else "not met"
            print(f"goal: ours within {SCAN_FLOOR_GOAL:.0f}x of the byte floor: {ratio:.1f}x, {verdict}")
        else:
            print("goals: GPU only; this CPU run claims none")


# ---------------------------------------------------------------------------------------------
# Part "block": one v2 block against one Llama block of the same width


def v2_one_block(dim: int, heads: int, impl: str, device: torch.device) -> MosaicsV2LM:
    """A one-block v2 model with the v2 small settings at this width (only its block and its
    per-forward context are timed). Each row is one document."""
    args = MosaicsArgs(version=2, dim=dim, n_layers=1, n_heads=heads, vocab_size=256, v2=MosaicsV2Args(key_scan_impl=impl))
    torch.manual_seed(0)
    model = MosaicsV2LM(args).to(device)
    model.init_weights()
    return model


def llama_block(dim: int, heads: int, ffn_dim: int, max_seqlen: int, device: torch.device) -> tuple[TransformerBlock, RotaryEmbedding]:
    """lingua's Llama block (attention + SwiGLU of width ffn_dim) and its RoPE tables."""
    args = BaseTransformerArgs(dim=dim, n_layers=1, n_heads=heads, max_seqlen=max_seqlen)
    ffn = FeedForward(dim, ffn_dim, dim**-0.5, ffn_dim**-0.5)
    torch.manual_seed(0)
    block = TransformerBlock(args, 0, ffn).to(device)
    block.init_weights()
    rope = RotaryEmbedding(args.resolved_head_dim, max_seqlen, args.rope_theta).to(device)
    rope.init_weights()
    return block, rope


def check_block_parity(device: torch.device, heads: int, dim: int) -> None:
    """The timed v2 block (op scan, flex on GPU) against the naive scan and a dense mask, fp32."""
    ours, reference = v2_one_block(dim, heads, "op", device), v2_one_block(dim, heads, "naive", device)
    reference.load_state_dict(ours.state_dict())
    ours.eval(), reference.eval()  # the same m (long_offset_eval) in both
    tokens = torch.zeros(2, 150, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 150, dim, generator=gen, device=device, requires_grad=True)
    grad = torch.randn(2, 150, dim, generator=gen, device=device)
    results = []
    for model, flex in ((ours, device.type == "cuda"), (reference, False)):
        y = model.layers[0](x, model.context(tokens, use_flex=flex))
        results.append((y, *torch.autograd.grad(y, (x, *model.layers[0].parameters()), grad)))
    for got, want in zip(*results):
        error = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
        if error > 1e-3:
            raise SystemExit(f"parity gate failed: the v2 block differs from its naive form by {error:.2e}")
    print("parity: the timed v2 block matches the naive scan with a dense mask (fp32, T=150, output and every gradient)")


def bench_block(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = cuda and not args.no_compile
    check_block_parity(device, args.heads, args.dim)
    v2 = v2_one_block(args.dim, args.heads, "op", device)
    v2_block = v2.layers[0]
    ffn_dim = v2.args.v2.resolved_ffn_dim(args.dim)
    llama, rope = llama_block(args.dim, args.heads, ffn_dim, max(args.lengths), device)
    v2_forward = torch.compile(v2_block) if compiled else v2_block
    llama_forward = torch.compile(llama) if compiled else llama
    backend = SdpaBackend()
    v2_params, llama_params = list(v2_block.parameters()), list(llama.parameters())
    for T in args.lengths:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, T, args.dim, generator=gen, device=device, requires_grad=True)
        grad = torch.randn(args.batch, T, args.dim, generator=gen, device=device)
        tokens = torch.zeros(args.batch, T, dtype=torch.long, device=device)
        context = v2.context(tokens)  # training mode: one draw of m
        cos_sin = rope(T)

        def v2_step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                y = v2_forward(x, context)
            torch.autograd.grad(y, (x, *v2_params), grad.to(y.dtype))

        def llama_step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                y = llama_forward(x, cos_sin, None, backend)
            torch.autograd.grad(y, (x, *llama_params), grad.to(y.dtype))

        timings = [
            time_fn("llama block (reference)", llama_step, args.warmup, args.repeats),
            time_fn("v2 block", v2_step, args.warmup, args.repeats),
        ]
        masks = time_fn("v2 masks and counts", lambda: v2.context(tokens), args.warmup, args.repeats)
        by_name = {t.name: t for t in timings}
        ratio = by_name["v2 block"].median_ms / by_name["llama block (reference)"].median_ms
        n_v2, n_llama = sum(p.numel() for p in v2_params), sum(p.numel() for p in llama_params)
        notes = {
            "llama block (reference)": f"{n_llama:,} params",
            "v2 block": f"{n_v2:,} params, {ratio:.2f}x the llama block's time",
        }
        print(f"\n### block forward+backward: B={args.batch} T={T} C={args.dim} H={args.heads} SwiGLU {ffn_dim}, "
              f"{dtype}, compiled={compiled}; v2 short window {v2.args.v2.short_window}, long-term m in "
              f"[{v2.args.v2.long_offset_min}, {v2.args.v2.long_offset_max}]")
        print(format_table(timings, reference="llama block (reference)", extra=notes))
        print(f"v2 masks and counts (built once per forward, shared by every block, not in the block time): {masks.median_ms:.3f} ms")
        if cuda:
            verdict = "met" if ratio <= BLOCK_RATIO_GOAL else "not met"
            print(f"goal: v2 block step within {BLOCK_RATIO_GOAL}x of the llama block's: {ratio:.2f}x, {verdict}")
        else:
            print("goals: GPU only; this CPU run claims none")


PARTS: dict[str, Callable[[argparse.Namespace, torch.device], None]] = {"scan": bench_scan, "block": bench_block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1024 4096; --tiny: 64 200)")
    parser.add_argument("--naive-max-t", type=int, default=4096, help="skip the naive loop beyond this T")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="block part: time the blocks eagerly on GPU")
    args = parser.parse_args()
    full_size_needs_gpu(args.tiny, "benchmarks.mosaics_v2")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch, args.dim, args.heads = 2, 48, 4
    args.lengths = args.lengths or ([64, 200] if args.tiny else [1024, 4096])
    for part in args.parts:  # in the order given (default: block, scan)
        PARTS[part](args, device)


if __name__ == "__main__":
    main()
