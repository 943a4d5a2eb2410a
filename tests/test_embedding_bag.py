"""The weighted embedding bag: Triton kernels (interpreter on CPU, compiled on a GPU) and the torch
backend against the naive reference, values and both gradients, at awkward sizes; float64
gradcheck of the op."""

from __future__ import annotations

import pytest
import torch

from lingua.product_key.embedding_bag import WeightedBagFunction, naive, weighted_embedding_bag
from lingua.product_key.embedding_bag import triton_bag

# Tolerances per table dtype: fp32 kernels accumulate in a different order than the reference
# (fp32 sums of up to ~40 terms); bf16 tables are rounded once on output.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}


class Densify(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient dense (gradcheck compares dense Jacobians)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def make_inputs(n_rows, dim, n_bags, bag_len, dtype=torch.float32, seed=0, hot_row=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_rows, dim, generator=gen).to(device, dtype).requires_grad_()
    indices = torch.randint(0, n_rows, (n_bags, bag_len), generator=gen)
    if hot_row:  # one row read by many entries: the backward walks it in several blocks
        indices.view(-1)[:: 3] = n_rows - 1
    weights = torch.randn(n_bags, bag_len, generator=gen).to(device).requires_grad_()
    return values, indices.to(device), weights


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "n_rows,dim,n_bags,bag_len,dtype",
    [(50, 60, 7, 21, torch.float32), (300, 100, 13, 35, torch.float32), (64, 37, 5, 3, torch.bfloat16), (9, 300, 3, 16, torch.float32)],
)
def test_bag_matches_reference(backend, n_rows, dim, n_bags, bag_len, dtype, device):
    values, indices, weights = make_inputs(n_rows, dim, n_bags, bag_len, dtype, device=device)
    out = weighted_embedding_bag(values, indices, weights, backend)
    grad_out = torch.randn(out.shape).to(device, out.dtype)
    out.backward(grad_out)
    ref_values = values.detach().clone().float().requires_grad_()
    ref_weights = weights.detach().clone().requires_grad_()
    ref = naive.weighted_bag_forward(ref_values, indices, ref_weights)
    ref.backward(grad_out.float())
    assert out.dtype == dtype and out.shape == (n_bags, dim)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    assert values.grad.is_sparse
    touched = torch.unique(indices)
    assert values.grad._nnz() == touched.numel()  # one entry per touched row, no duplicates
    assert torch.equal(values.grad.coalesce().indices()[0], touched)
    torch.testing.assert_close(values.grad.to_dense().float(), ref_values.grad, **TOL[dtype])
    torch.testing.assert_close(weights.grad, ref_weights.grad, **TOL[dtype])


def test_kernels_write_every_output(device):
    """Launchers fill NaN-initialized buffers completely (no unwritten rows or entries)."""
    values, indices, weights = make_inputs(40, 70, 11, 19, device=device)
    values, weights = values.detach(), weights.detach()
    out = triton_bag._fwd(values, indices, weights)
    assert torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    rows, grad_rows, grad_weights = triton_bag._bwd(values, indices, weights, grad_out, True, True)
    assert torch.isfinite(grad_rows).all() and torch.isfinite(grad_weights).all()
    ref_rows, ref_grad_rows, ref_grad_weights = naive.weighted_bag_backward(values, indices, weights, grad_out)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(grad_rows, ref_grad_rows, **TOL[torch.float32])
    torch.testing.assert_close(grad_weights, ref_grad_weights, **TOL[torch.float32])


def test_forward_output_fully_written(monkeypatch, device):
    values, indices, weights = make_inputs(30, 45, 6, 9, device=device)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(triton_bag.torch, "empty", nan_empty)
    out = triton_bag._fwd(values.detach(), indices, weights.detach())
    rows, grad_rows, grad_weights = triton_bag._bwd(values.detach(), indices, weights.detach(), torch.randn_like(out), True, True)
    assert not out.isnan().any() and not grad_rows.isnan().any() and not grad_weights.isnan().any()


def test_only_requested_gradients(device):
    values, indices, weights = make_inputs(20, 8, 4, 5, device=device)
    weights = weights.detach()
    weighted_embedding_bag(values, indices, weights, "triton").sum().backward()
    assert values.grad is not None and weights.grad is None
    values2 = values.detach()
    weights2 = weights.clone().requires_grad_()
    weighted_embedding_bag(values2, indices, weights2, "triton").sum().backward()
    ref = torch.einsum("nld->nl", values2[indices])
    torch.testing.assert_close(weights2.grad, ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradcheck_float64(backend, device):
    values, indices, weights = make_inputs(8, 5, 3, 6, torch.float64, hot_row=True, device=device)
    weights = weights.detach().double().requires_grad_()
    values = values.detach().requires_grad_()

    def fn(v, w):
        return WeightedBagFunction.apply(Densify.apply(v), indices, w, backend)

    # fast_mode checks random projections of the Jacobian: few kernel launches in the interpreter.
    assert torch.autograd.gradcheck(fn, (values, weights), eps=1e-6, atol=1e-8, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n_bags,bag_len", [(0, 4), (3, 0)])
def test_empty_bags(backend, n_bags, bag_len, device):
    values, indices, weights = make_inputs(10, 6, n_bags, bag_len, device=device)
    out = weighted_embedding_bag(values, indices, weights, backend)
    out.sum().backward()
    assert out.shape == (n_bags, 6) and not out.any()
    assert values.grad._nnz() == 0 and weights.grad.shape == (n_bags, bag_len)


def test_argument_checks():
    values, indices, weights = make_inputs(10, 4, 3, 2)
    with pytest.raises(ValueError, match="expected values"):
        weighted_embedding_bag(values, indices, weights[:, :1])
    with pytest.raises(TypeError, match="integers"):
        weighted_embedding_bag(values, indices.float(), weights)
    with pytest.raises(ValueError, match="backend"):
        weighted_embedding_bag(values, indices, weights, "cuda")  # type: ignore[arg-type]


def test_benchmark_tiny_runs_and_reports(capsys):
    from benchmarks import pk_bag

    pk_bag.main(["--tiny", "--warmup", "0", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| ours (row-sparse grad) |" in out and "| F.embedding_bag (dense grad) |" in out and "device:" in out
