"""Weighted embedding bag of product-key memory, forward + backward: ours vs references.

    python -m benchmarks.pk_bag                 # GPU: 1M x 1024 table, 8192 tokens x 4 heads x 32 knn
    python -m benchmarks.pk_bag --tiny          # CPU, small shape, seconds

Candidates, timed in the same run after a parity gate (outputs and both gradients):
- ours: `weighted_embedding_bag` (Triton on CUDA, torch on CPU), row-sparse value gradient;
- F.embedding_bag(mode="sum", per_sample_weights): torch's op, dense [K, D] value gradient;
- dense-grad Triton (GPU only): our forward kernel plus a backward that atomically adds into a
  zeroed dense [K, D] gradient (the public memory code's formulation, rewritten here).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.timing import format_table, full_size_needs_gpu, time_fn
from lingua.product_key.embedding_bag import naive, weighted_embedding_bag
from lingua.product_key.embedding_bag.triton_bag import _fwd


@triton.jit
def _dense_grad_bwd_kernel(V, IDX, W, GO, GV, GW, L, D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per bag: score grads <g, V[row]> and atomic adds of w * g into the dense gradient."""
    n = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    for l0 in range(0, L, BLOCK_L):
        mask_l = l0 + offs_l < L
        rows = tl.load(IDX + n * L + l0 + offs_l, mask=mask_l, other=0).to(tl.int64)
        w = tl.load(W + n * L + l0 + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        dots = tl.zeros([BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_l[:, None] & (offs_d < D)[None, :]
            g = tl.load(GO + n * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            dots += tl.sum(v * g[None, :], axis=1)
            tl.atomic_add(GV + rows[:, None] * D + offs_d[None, :], w[:, None] * g[None, :], mask=mask)
        tl.store(GW + n * L + l0 + offs_l, dots, mask=mask_l)


class DenseGradBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights):
        ctx.save_for_backward(values, indices, weights)
        return _fwd(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        n_bags, bag_len = indices.shape
        grad_values = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        grad_weights = torch.empty(n_bags, bag_len, dtype=torch.float32, device=values.device)
        _dense_grad_bwd_kernel[(n_bags,)](
            values, indices, weights, grad_out.contiguous(), grad_values, grad_weights, bag_len, values.shape[1],
            BLOCK_L=32, BLOCK_D=128,
        )
        return grad_values.to(values.dtype), None, grad_weights.to(weights.dtype)


def candidates(device: torch.device) -> dict[str, object]:
    def ours(v, i, w):
        return weighted_embedding_bag(v, i, w)

    def torch_bag(v, i, w):
        return F.embedding_bag(i, v, per_sample_weights=w.to(v.dtype), mode="sum")

    found = {"ours (row-sparse grad)": ours, "F.embedding_bag (dense grad)": torch_bag}
    if device.type == "cuda":
        found["dense-grad Triton"] = DenseGradBag.apply
    return found


def make_inputs(n_rows: int, dim: int, n_tokens: int, bag_len: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = (torch.randn(n_rows, dim, generator=gen) * dim**-0.5).to(device=device, dtype=dtype).requires_grad_()
    indices = torch.randint(0, n_rows, (n_tokens, bag_len), generator=gen).to(device)
    weights = torch.softmax(torch.randn(n_tokens, bag_len, generator=gen), -1).to(device).requires_grad_()
    grad_out = torch.randn(n_tokens, dim, generator=gen).to(device=device, dtype=dtype)
    return values, indices, weights, grad_out


def check_parity(device: torch.device, dtype: torch.dtype) -> None:
    """Every candidate against the naive reference at a moderate shape (fp32 accumulation)."""
    values, indices, weights, grad_out = make_inputs(4096, 96, 300, 40, dtype, device, seed=1)
    ref_out = naive.weighted_bag_forward(values.detach().float(), indices, weights.detach())
    _, _, ref_gw = naive.weighted_bag_backward(values.detach().float(), indices, weights.detach(), grad_out.float())
    ref_gv = naive.weighted_bag_dense_grad(values.detach().float(), indices, weights.detach(), grad_out.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for name, fn in candidates(device).items():
        values.grad = weights.grad = None
        out = fn(values, indices, weights)
        out.backward(grad_out)
        grad_values = values.grad.to_dense() if values.grad.is_sparse else values.grad
        torch.testing.assert_close(out.float(), ref_out, **tol, msg=f"{name}: output")
        torch.testing.assert_close(grad_values.float(), ref_gv, **tol, msg=f"{name}: value grad")
        torch.testing.assert_close(weights.grad.float(), ref_gw, **tol, msg=f"{name}: score grad")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape for CPU")
    parser.add_argument("--rows", type=int, default=1024**2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--bag", type=int, default=4 * 32, help="heads * knn")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    full_size_needs_gpu(args.tiny, "benchmarks.pk_bag")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    if args.tiny:
        args.rows, args.dim, args.tokens, args.bag = 32**2, 32, 128, 16

    check_parity(device, dtype)
    values, indices, weights, grad_out = make_inputs(args.rows, args.dim, args.tokens, args.bag, dtype, device)

    def fwd_bwd(fn):
        def run() -> None:
            values.grad = weights.grad = None
            fn(values, indices, weights).backward(grad_out)

        return run

    timings = [time_fn(name, fwd_bwd(fn), args.warmup, args.repeats) for name, fn in candidates(device).items()]
    n_unique = torch.unique(indices).numel()
    print(
        f"shape: table {args.rows} x {args.dim} {dtype}, {args.tokens} tokens x {args.bag} lookups, "
        f"{n_unique} unique rows; fwd + bwd (parity checked against the naive reference)"
    )
    print(format_table(timings, reference="F.embedding_bag (dense grad)"))


if __name__ == "__main__":
    main()
