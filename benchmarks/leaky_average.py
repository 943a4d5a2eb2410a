"""Leaky-average operator: ours (custom op: Triton on GPU) vs the naive T x T matmul form vs the
chunked torch scan, forward and forward+backward, with achieved bandwidth against the HBM floor.

    python -m benchmarks.leaky_average                 # B=8, C=768, H=12, bf16, T = 512 ... 16384 (GPU)
    python -m benchmarks.leaky_average --tiny          # small shapes on CPU, fp32

Parity is checked first (each form against the naive one in fp32 at a small T). The floor is the
bytes each call must move (forward: read x, write y; forward+backward adds read x and dy, write dx)
at the measured 2.99 TB/s HBM copy rate of an H100; the naive form is skipped where its (H, T, T)
weights would not fit comfortably (T > --naive-max-t).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import format_table, full_size_needs_gpu, time_fn
from lingua.mosaics.leaky_average import leaky_average

HBM_BYTES_PER_S = 2.99e12  # H100 HBM copy (read + write), measured
IMPLS = {"naive (T x T matmul)": "naive", "chunked torch": "chunked", "ours (op)": "op"}


def check_parity(device: torch.device, heads: int, dim: int) -> None:
    x = torch.randn(2, 300, dim, device=device, requires_grad=True)
    beta = torch.linspace(0.05, 5.0, heads, device=device).requires_grad_()
    g = torch.randn_like(x)
    ref = leaky_average(x, beta, impl="naive")
    ref_grads = torch.autograd.grad(ref, (x, beta), g)
    for name, impl in IMPLS.items():
        y = leaky_average(x, beta, impl=impl)
        grads = torch.autograd.grad(y, (x, beta), g)
        for got, want in zip((y, *grads), (ref, *ref_grads)):
            err = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
            if err > 1e-3:
                raise SystemExit(f"parity gate failed: {name} differs from the naive form by {err:.2e}")
    print("parity: every form matches the naive one (fp32, T=300)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--naive-max-t", type=int, default=4096)
    parser.add_argument("--compile-chunked", action="store_true", help="torch.compile the chunked form (GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    full_size_needs_gpu(args.tiny, "benchmarks.leaky_average")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch, args.dim, args.heads, args.lengths = 2, 48, 4, [64, 200]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_parity(device, args.heads, args.dim)
    chunked = torch.compile(leaky_average) if args.compile_chunked and device.type == "cuda" else leaky_average
    for T in args.lengths:
        x = torch.randn(args.batch, T, args.dim, device=device, dtype=dtype, requires_grad=True)
        beta = torch.linspace(0.5, 5.0, args.heads, device=device).requires_grad_()
        g = torch.randn_like(x)
        elem = x.element_size() * x.numel()
        for mode, bytes_moved in (("forward", 2 * elem), ("forward+backward", 5 * elem)):
            timings, notes = [], {}
            for name, impl in IMPLS.items():
                if impl == "naive" and T > args.naive_max_t:
                    continue
                fn = chunked if impl == "chunked" else leaky_average

                def call(fn=fn, impl=impl) -> None:
                    if mode == "forward":
                        with torch.no_grad():
                            fn(x, beta, impl=impl)
                    else:
                        torch.autograd.grad(fn(x, beta, impl=impl), (x, beta), g)

                timing = time_fn(name, call, args.warmup, args.repeats)
                timings.append(timing)
                floor_ms = bytes_moved / HBM_BYTES_PER_S * 1e3
                notes[name] = f"{bytes_moved / (timing.median_ms / 1e3) / 1e9:.1f} GB/s"
                if device.type == "cuda":
                    notes[name] += f", {timing.median_ms / floor_ms:.1f}x the HBM floor"
            reference = "naive (T x T matmul)" if any(t.name.startswith("naive") for t in timings) else "chunked torch"
            print(f"\n### {mode}: B={args.batch} T={T} C={args.dim} H={args.heads} {dtype}")
            print(format_table(timings, reference=reference, extra=notes))


if __name__ == "__main__":
    main()
