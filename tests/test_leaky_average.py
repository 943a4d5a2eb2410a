"""The leaky average: every implementation (chunked torch, custom op, Triton kernels: interpreted on
CPU, compiled on a GPU) against the explicit T x T reference, in values and in gradients for x and
beta."""

import pytest
import torch

from lingua.mosaics.leaky_average import (
    discounted_sum_naive,
    leaky_average,
    leaky_average_naive,
    leaky_scan_op,
    normalized_leaky_average_naive,
)
from lingua.mosaics.leaky_average.triton_scan import LeakyScanTriton, scan_bwd, scan_fwd

# (B, T, H, D): T below, at and not a multiple of the chunk; awkward head sizes.
SHAPES = [(2, 1, 1, 3), (2, 37, 3, 5), (1, 75, 2, 10), (2, 130, 4, 3)]
BETAS = [0.05, 3.0, 0.7, 9.0]


def _inputs(B, T, H, D, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H * D, generator=gen, dtype=dtype).to(device).requires_grad_()
    beta = torch.tensor(BETAS[:H], dtype=dtype, device=device).requires_grad_()
    return x, beta


def _grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return torch.autograd.grad(y, inputs, g)


def _close(actual, expected, tol):
    """Max abs error relative to the reference's largest magnitude."""
    scale = expected.abs().max().clamp(min=1.0)
    assert ((actual.double() - expected.double()).abs().max() / scale).item() < tol


@pytest.mark.parametrize("impl", ["chunked", "op"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_forms_match_naive_float64(impl, shape):
    x, beta = _inputs(*shape)
    ref = leaky_average_naive(x, beta)
    y = leaky_average(x, beta, impl=impl, chunk_size=16)
    _close(y, ref, 1e-10)
    for got, want in zip(_grads(y, (x, beta)), _grads(ref, (x, beta))):
        _close(got, want, 1e-10)


@pytest.mark.parametrize("impl", ["naive", "chunked", "op"])
def test_normalized_form_matches_naive(impl):
    x, beta = _inputs(2, 45, 3, 5)
    bonus = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref = normalized_leaky_average_naive(x, beta, bonus)
    y = leaky_average(x, beta, form="normalized", bonus_H=bonus, impl=impl, chunk_size=16)
    _close(y, ref, 1e-10)
    for got, want in zip(_grads(y, (x, beta, bonus)), _grads(ref, (x, beta, bonus))):
        _close(got, want, 1e-10)


def test_normalized_form_with_bonus_beta_is_the_bias_corrected_ema():
    x, beta = _inputs(1, 30, 2, 4)
    y = leaky_average(x, beta, form="normalized", impl="chunked")
    t = torch.arange(30, dtype=torch.float64)[:, None]
    correction = -torch.expm1(-beta.repeat_interleave(4)[None] * (t + 1))
    _close(y, leaky_average_naive(x, beta) / correction, 1e-10)


def test_naive_is_the_recurrence():
    x, beta = _inputs(1, 20, 2, 3)
    a = torch.exp(-beta).repeat_interleave(3)
    state, expected = torch.zeros(6, dtype=torch.float64), []
    for t in range(20):
        state = a * state + (1 - a) * x[0, t]
        expected.append(state)
    _close(leaky_average_naive(x, beta)[0], torch.stack(expected), 1e-12)


def test_beta_gradient_is_the_true_gradient():
    """Finite differences of the loss in beta (the public CUDA kernel scales this gradient by beta)."""
    x, beta = _inputs(1, 50, 2, 4)
    g = torch.randn(1, 50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (d_beta,) = torch.autograd.grad((leaky_average(x, beta) * g).sum(), beta)
    eps = 1e-6
    for h in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[h] = eps
        diff = ((leaky_average(x, beta + step) - leaky_average(x, beta - step)) * g).sum() / (2 * eps)
        assert abs(diff.item() - d_beta[h].item()) < 1e-6 * max(1.0, abs(diff.item()))


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("shape", [(2, 75, 2, 10), (1, 16, 3, 5), (2, 5, 1, 17)], ids=str)
def test_triton_kernels_fp32(ema, shape, device):
    x64, beta64 = _inputs(*shape, device=device)
    ref = leaky_average_naive(x64, beta64) if ema else discounted_sum_naive(x64, beta64)
    x, beta = x64.detach().float(), beta64.detach().float()
    y, states = scan_fwd(x, beta, ema, chunk_size=16, fill_nan=True)
    assert not states.isnan().any()
    _close(y, ref, 1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    dx_ref, dbeta_ref = torch.autograd.grad(ref, (x64, beta64), g)
    dx, dbeta = scan_bwd(g.float(), x, beta, states, ema, chunk_size=16, fill_nan=True)
    _close(dx, dx_ref, 1e-5)
    _close(dbeta, dbeta_ref, 1e-5)


def test_triton_kernels_bf16_inputs(device):
    x64, beta64 = _inputs(2, 40, 2, 8, device=device)
    ref = leaky_average_naive(x64, beta64)
    x = x64.detach().bfloat16()
    y = LeakyScanTriton.apply(x.requires_grad_(), beta64.detach().float().requires_grad_(), True, 16)
    assert y.dtype == torch.bfloat16
    _close(y, ref, 2e-2)


def test_triton_function_gradcheck_float64(device):
    x, beta = _inputs(1, 19, 2, 3, device=device)
    assert torch.autograd.gradcheck(lambda x, b: LeakyScanTriton.apply(x, b, True, 16), (x, beta), fast_mode=True)


def test_op_gradcheck_and_opcheck(device):
    x, beta = _inputs(1, 21, 2, 3, device=device)
    assert torch.autograd.gradcheck(lambda x, b: leaky_scan_op(x, b, True, 16)[0], (x, beta))
    torch.library.opcheck(leaky_scan_op, (x, beta, True, 16))


def test_op_compiles_without_graph_breaks(device, compile_backend):
    x, beta = _inputs(2, 37, 2, 4, dtype=torch.float32, device=device)

    def f(x, theta):
        return leaky_average(torch.sin(x), 10 * theta.abs(), impl="op", chunk_size=16).square().sum()

    compiled = torch.compile(f, backend=compile_backend, fullgraph=True)
    theta = (beta / 10).detach().requires_grad_()
    eager_grads = torch.autograd.grad(f(x, theta), (x, theta))
    compiled_grads = torch.autograd.grad(compiled(x, theta), (x, theta))
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="C % H"):
        leaky_average(torch.zeros(1, 4, 5), torch.ones(2))
    with pytest.raises(ValueError, match="impl"):
        leaky_average(torch.zeros(1, 4, 4), torch.ones(2), impl="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        scan_fwd(torch.zeros(1, 4, 4), torch.ones(2), True, chunk_size=24)
    with pytest.raises(ValueError, match="from 16 to 64"):
        scan_fwd(torch.zeros(1, 4, 4), torch.ones(2), True, chunk_size=128)


def test_benchmark_tiny_runs_and_reports():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaky_average", "--tiny", "--warmup", "1", "--repeats", "2"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity:" in result.stdout and "| ours (op) |" in result.stdout and "| naive (T x T matmul) |" in result.stdout
