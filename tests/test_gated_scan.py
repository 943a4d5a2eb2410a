"""The gated key scan of Memory Mosaics v2: every implementation (chunked torch, custom op, Triton
kernels: interpreted on CPU, compiled on a GPU) against the naive loop over time, in values and in
gradients for x, log_gate and log_decay, with document resets and extreme gates."""

import pytest
import torch

from lingua.mosaics.gated_scan import gated_key_scan, gated_key_scan_naive, gated_key_scan_op
from lingua.mosaics.gated_scan.triton_scan import scan_bwd, scan_fwd

# Max error relative to the reference's largest magnitude, per dtype of the compared computation.
TOLERANCE = {
    torch.float64: 1e-10,  # the same math in another order: rounding only
    torch.float32: 2e-5,  # fp32 accumulation over a few chunks
    torch.bfloat16: 2e-2,  # bf16 inputs and outputs (8 mantissa bits), fp32 inside
}


def _close(actual, expected, dtype):
    """Max error relative to the reference's largest magnitude (absolute where that is under 1)."""
    scale = expected.abs().max().clamp(min=1.0)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error < TOLERANCE[dtype], f"relative error {error:.3e} over {TOLERANCE[dtype]:.0e}"


def _inputs(B, T, H, D, seed=0, gate_scale=3.0, decay_scale=1.0, doc_rate=0.05, device="cpu"):
    """x, log_gate, log_decay (float64, requiring grad) and doc_start with a few random restarts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H * D, generator=gen, dtype=torch.float64)
    log_gate = gate_scale * torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    log_decay = -decay_scale * torch.randn(B, T, H, generator=gen, dtype=torch.float64).abs()
    doc_start = torch.rand(B, T, generator=gen) < doc_rate
    tensors = [t.to(device).requires_grad_() for t in (x, log_gate, log_decay)]
    return (*tensors, doc_start.to(device))


def _reference(inputs, eps=1e-6, with_docs=True):
    """The naive loop's keys, the output gradient fed to every form, and the three input gradients."""
    x, g, d, doc = inputs
    ref = gated_key_scan_naive(x, g, d, doc if with_docs else None, eps)
    dk = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype).to(ref.device)
    return ref, dk, torch.autograd.grad(ref, (x, g, d), dk)


def _check_against_naive(impl, inputs, dtype=torch.float64, chunk_size=16, eps=1e-6, reference=None):
    x, g, d, doc = inputs
    ref, dk, ref_grads = reference or _reference(inputs, eps)
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, g, d)]
    y = gated_key_scan(*cast, doc, eps=eps, impl=impl, chunk_size=chunk_size)
    assert y.dtype == dtype
    _close(y, ref, dtype)
    for got, want in zip(torch.autograd.grad(y, cast, dk.to(dtype)), ref_grads):
        _close(got, want, dtype)


@pytest.fixture(scope="module")
def long_case():
    """T = 4096 at tiny B, H, D, and its naive reference (computed once: the loop is the slow part)."""
    inputs = _inputs(1, 4096, 1, 2, doc_rate=0.002)
    return inputs, _reference(inputs)


@pytest.mark.parametrize("impl", ["chunked", "op"])
@pytest.mark.parametrize("shape", [(2, 1, 2, 3), (2, 7, 3, 5), (2, 64, 2, 4), (1, 300, 2, 6)], ids=str)
def test_torch_forms_match_naive_float64(impl, shape):
    _check_against_naive(impl, _inputs(*shape))


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_long_sequence_matches_naive(impl, long_case):
    inputs, reference = long_case
    _check_against_naive(impl, inputs, chunk_size=64, reference=reference)


@pytest.mark.parametrize("impl", ["chunked", "op"])
@pytest.mark.parametrize(
    "gate_scale,decay_scale", [(80.0, 1.0), (1000.0, 1.0), (3.0, 50.0), (3.0, 1e-7), (200.0, 1e-7)],
    ids=["gates 80", "gates 1000", "decays near 0", "decays near 1", "gates 200 decays near 1"],
)
def test_extreme_gates_and_decays(impl, gate_scale, decay_scale):
    """exp(log_gate) overflows fp32 from 89 and fp64 from 710: only the rescaled state survives."""
    inputs = _inputs(2, 75, 2, 4, gate_scale=gate_scale, decay_scale=decay_scale)
    _check_against_naive(impl, inputs)
    _check_against_naive(impl, inputs, dtype=torch.float32)


def test_naive_is_the_recurrence():
    """The rescaled loop against kbar computed directly in float64 (moderate gates, no overflow)."""
    x, g, d, doc = _inputs(1, 30, 2, 3, gate_scale=2.0)
    doc[0, 11] = True
    kbar = torch.zeros(2, 3, dtype=torch.float64)
    expected = []
    for t in range(30):
        if doc[0, t]:
            kbar = torch.zeros_like(kbar)
        kbar = g[0, t].exp()[:, None] * x[0, t].view(2, 3) + d[0, t].exp()[:, None] * kbar
        expected.append((kbar / kbar.norm(dim=-1, keepdim=True)).flatten())
    _close(gated_key_scan_naive(x, g, d, doc)[0], torch.stack(expected), torch.float64)


@pytest.mark.parametrize("impl", ["naive", "chunked", "op"])
def test_documents_restart_the_state(impl):
    """Keys after a document start are those of the document scanned alone; nothing leaks back."""
    x, g, d, _ = _inputs(1, 50, 2, 3)
    doc = torch.zeros(1, 50, dtype=torch.bool)
    doc[0, [17, 40]] = True
    y = gated_key_scan(x, g, d, doc, impl=impl, chunk_size=16)
    for start, end in ((0, 17), (17, 40), (40, 50)):
        alone = gated_key_scan_naive(x[:, start:end], g[:, start:end], d[:, start:end])
        _close(y[:, start:end], alone, torch.float64)
    grads = torch.autograd.grad(y[:, 17:40].sum(), (x, g, d))
    for grad in grads:  # zero up to rounding (the op's decay gradient sums a chunk's terms that cancel)
        assert grad[:, :17].abs().max() < 1e-12 and grad[:, 40:].abs().max() < 1e-12
        assert grad[:, 17:40].abs().max() > 1e-3
    assert (grads[2][:, 17] == 0).all()  # the decay at a document start multiplies an empty state


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_keys_under_eps_match_naive(impl):
    """|s| < eps: the key is s / eps and depends on the rescale m, whose gradient must flow too."""
    x, g, d, doc = _inputs(2, 40, 2, 3)
    tiny = (x.detach() * 1e-9).requires_grad_()
    _check_against_naive(impl, (tiny, g, d, doc))


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_gradcheck_float64(impl, device):
    """Full Jacobians for the op's explicit backward; a random projection for torch autograd's."""
    x, g, d, doc = _inputs(1, 19, 2, 2, doc_rate=0.1, device=device)
    assert torch.autograd.gradcheck(
        lambda x, g, d: gated_key_scan(x, g, d, doc, impl=impl, chunk_size=16), (x, g, d), fast_mode=impl == "chunked"
    )


def test_op_opcheck(device):
    x, g, d, doc = _inputs(1, 21, 2, 3, doc_rate=0.1, device=device)
    torch.library.opcheck(gated_key_scan_op, (x, g, d, doc, 1e-6, 16))


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_bf16_inputs_accumulate_in_fp32(impl):
    _check_against_naive(impl, _inputs(2, 40, 2, 8), dtype=torch.bfloat16)


def test_op_compiles_without_graph_breaks(device, compile_backend):
    x, g, d, doc = (t.detach().float() if t.is_floating_point() else t for t in _inputs(2, 37, 2, 4, device=device))

    def f(x, w):
        keys = gated_key_scan(torch.sin(x), x[..., :2] * w, -(x[..., 2:4] * w).abs(), doc, chunk_size=16)
        return keys.square().mean() + keys[..., 0].sum()

    w = torch.tensor(0.7, device=device, requires_grad=True)
    x.requires_grad_()
    eager = torch.autograd.grad(f(x, w), (x, w))
    compiled = torch.autograd.grad(torch.compile(f, backend=compile_backend, fullgraph=True)(x, w), (x, w))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _check_kernels(inputs, dtype=torch.float32, chunk_size=16, eps=1e-6, with_docs=True, reference=None):
    """scan_fwd / scan_bwd into NaN-filled outputs against the naive loop, random output gradients."""
    x, g, d, doc = inputs
    doc = doc if with_docs else None
    ref, dk, ref_grads = reference or _reference(inputs, eps, with_docs)
    cast = [t.detach().to(dtype) for t in (x, g, d)]
    keys, m_states, s_states = scan_fwd(*cast, doc, eps, chunk_size, fill_nan=True)
    assert keys.dtype == dtype and not m_states.isnan().any() and not s_states.isnan().any()
    _close(keys, ref, dtype)
    grads = scan_bwd(dk.to(dtype), *cast, doc, m_states, s_states, eps, chunk_size, fill_nan=True)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        _close(got, want, dtype)


@pytest.mark.parametrize("shape", [(2, 1, 2, 3, 16), (2, 7, 3, 5, 16), (2, 64, 2, 4, 16), (1, 300, 2, 6, 32)], ids=str)
def test_triton_kernels_match_naive(shape, device):
    B, T, H, D, chunk_size = shape
    _check_kernels(_inputs(B, T, H, D, device=device), chunk_size=chunk_size)


def test_triton_kernels_long_sequence(long_case, device):
    inputs, (ref, dk, ref_grads) = long_case
    inputs = [t.detach().to(device) for t in inputs]
    reference = (ref.to(device), dk.to(device), [grad.to(device) for grad in ref_grads])
    _check_kernels(inputs, chunk_size=64, reference=reference)


@pytest.mark.parametrize(
    "gate_scale,decay_scale", [(80.0, 1.0), (1000.0, 1.0), (3.0, 50.0), (3.0, 1e-7)],
    ids=["gates 80", "gates 1000", "decays near 0", "decays near 1"],
)
def test_triton_kernels_extreme_gates(gate_scale, decay_scale, device):
    _check_kernels(_inputs(2, 45, 2, 4, gate_scale=gate_scale, decay_scale=decay_scale, device=device))


def test_triton_kernels_without_documents_and_under_eps(device):
    _check_kernels(_inputs(2, 37, 2, 4, device=device), with_docs=False)
    x, g, d, doc = _inputs(2, 37, 2, 4, device=device)
    _check_kernels(((x.detach() * 1e-9).requires_grad_(), g, d, doc), dtype=torch.float64)


def test_triton_kernels_bf16_inputs(device):
    _check_kernels(_inputs(2, 40, 2, 8, device=device), dtype=torch.bfloat16)


class _KernelScan(torch.autograd.Function):
    """The two launchers as one differentiable function, to gradcheck the kernels on any device."""

    @staticmethod
    def forward(ctx, x, g, d, doc):
        keys, m_states, s_states = scan_fwd(x, g, d, doc, 1e-6, 16)
        ctx.save_for_backward(x, g, d, doc, m_states, s_states)
        return keys

    @staticmethod
    def backward(ctx, dk):
        x, g, d, doc, m_states, s_states = ctx.saved_tensors
        return (*scan_bwd(dk, x, g, d, doc, m_states, s_states, 1e-6, 16), None)


def test_triton_kernels_gradcheck_float64(device):
    x, g, d, doc = _inputs(1, 19, 2, 2, doc_rate=0.1, device=device)
    assert torch.autograd.gradcheck(lambda x, g, d: _KernelScan.apply(x, g, d, doc), (x, g, d), fast_mode=True)


def test_bad_arguments_are_rejected():
    x, g, d = torch.zeros(1, 4, 6), torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    cases = [
        (dict(impl="fast"), "impl"),
        (dict(x_BTC=torch.zeros(4, 6)), "x_BTC"),
        (dict(log_gate_BTH=torch.zeros(1, 5, 2)), "log_gate_BTH"),
        (dict(log_decay_BTH=torch.zeros(1, 4, 3)), "head count"),
        (dict(log_gate_BTH=torch.zeros(1, 4, 4), log_decay_BTH=torch.zeros(1, 4, 4)), "C % H"),
        (dict(doc_start_BT=torch.zeros(1, 4)), "doc_start_BT"),
        (dict(eps=0.0), "eps"),
        (dict(chunk_size=24), "power of two"),
        (dict(chunk_size=128), "from 16 to 64"),
        (dict(chunk_size=0, impl="chunked"), "chunk_size"),
    ]
    for overrides, message in cases:
        kwargs = dict(x_BTC=x, log_gate_BTH=g, log_decay_BTH=d) | overrides
        with pytest.raises(ValueError, match=message):
            gated_key_scan(**kwargs)


def test_benchmark_tiny_runs_and_reports():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.mosaics_v2", "--tiny", "--parts", "scan", "--warmup", "1", "--repeats", "1"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "parity:" in out and "device:" in out and "byte floor" in out and "copy rate" in out
    for name in ("ours (op)", "naive loop", "cumsum of logs", "chunked torch"):
        assert f"| {name} |" in out, name
    assert "speedup vs naive loop" in out and "speedup vs cumsum of logs" in out
    assert "this CPU run claims none" in out and "goal: ours" not in out
