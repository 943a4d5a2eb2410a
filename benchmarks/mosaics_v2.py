"""Memory Mosaics v2 benchmarks, one run, ratios printed side by side.

    python -m benchmarks.mosaics_v2                  # GPU: B=4, C=2048, H=16 (v2 small), T = 1024, 4096
    python -m benchmarks.mosaics_v2 --tiny           # small shapes on CPU; claims no GPU goal

Part "scan": the gated key scan forward+backward (gradients of x, log_gate and log_decay), ours
(the custom op: Triton on GPU) against the naive loop over time, the chunked torch scan and a plain
`torch.cumsum`-of-logs formulation (one global shift instead of a running max: cheap, but it
underflows over long sequences with strong decays and ignores documents, so the timed inputs use
mild decays). Parity is checked first, each form against the naive loop in fp32 at a small T. The
floor is the bytes the fused forward and backward must move (read x, the gates, the output
gradient; write keys and the three gradients) at the copy rate of this device measured in the
same run. GPU goal: within 3x of that floor.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.timing import format_table, time_fn
from lingua.mosaics.gated_scan import gated_key_scan

SCAN_FLOOR_GOAL = 3.0  # ours within this factor of the byte floor (GPU)


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


PARTS: dict[str, Callable[[argparse.Namespace, torch.device], None]] = {"scan": bench_scan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--naive-max-t", type=int, default=4096, help="skip the naive loop beyond this T")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch, args.dim, args.heads, args.lengths = 2, 48, 4, [64, 200]
    for part in args.parts:
        PARTS[part](args, device)


if __name__ == "__main__":
    main()
