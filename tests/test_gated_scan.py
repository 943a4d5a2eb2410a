"""The gated key scan of Memory Mosaics v2: every implementation (chunked torch, custom op, Triton
kernels: interpreted on CPU, compiled on a GPU) against the naive loop over time, in values and in
gradients for x, log_gate and log_decay, with document resets and extreme gates."""

import pytest
import torch

from lingua.mosaics.gated_scan import gated_key_scan, gated_key_scan_naive, gated_key_scan_op

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


def _grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return torch.autograd.grad(y, inputs, g)


def _check_against_naive(impl, inputs, dtype=torch.float64, chunk_size=16, eps=1e-6):
    x, g, d, doc = inputs
    ref = gated_key_scan_naive(x, g, d, doc, eps)
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, g, d)]
    y = gated_key_scan(*cast, doc, eps=eps, impl=impl, chunk_size=chunk_size)
    assert y.dtype == dtype
    _close(y, ref, dtype)
    for got, want in zip(_grads(y.double(), cast), _grads(ref, (x, g, d))):
        _close(got, want, dtype)


@pytest.mark.parametrize("impl", ["chunked", "op"])
@pytest.mark.parametrize("shape", [(2, 1, 2, 3), (2, 7, 3, 5), (2, 64, 2, 4), (1, 300, 2, 6)], ids=str)
def test_torch_forms_match_naive_float64(impl, shape):
    _check_against_naive(impl, _inputs(*shape))


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_long_sequence_matches_naive(impl):
    _check_against_naive(impl, _inputs(1, 4096, 1, 2, doc_rate=0.002), chunk_size=64)


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
def test_gradcheck_float64(impl):
    x, g, d, doc = _inputs(1, 19, 2, 2, doc_rate=0.1)
    assert torch.autograd.gradcheck(
        lambda x, g, d: gated_key_scan(x, g, d, doc, impl=impl, chunk_size=16), (x, g, d)
    )


def test_op_opcheck():
    x, g, d, doc = _inputs(1, 21, 2, 3, doc_rate=0.1)
    torch.library.opcheck(gated_key_scan_op, (x, g, d, doc, 1e-6, 16))
    torch.library.opcheck(gated_key_scan_op, (x, g, d, None, 1e-6, 16))


@pytest.mark.parametrize("impl", ["chunked", "op"])
def test_bf16_inputs_accumulate_in_fp32(impl):
    _check_against_naive(impl, _inputs(2, 40, 2, 8), dtype=torch.bfloat16)


def test_op_compiles_without_graph_breaks():
    x, g, d, doc = (t.detach().float() if t.is_floating_point() else t for t in _inputs(2, 37, 2, 4))

    def f(x, w):
        keys = gated_key_scan(torch.sin(x), x[..., :2] * w, -(x[..., 2:4] * w).abs(), doc, chunk_size=16)
        return keys.square().mean() + keys[..., 0].sum()

    w = torch.tensor(0.7, requires_grad=True)
    x.requires_grad_()
    eager = torch.autograd.grad(f(x, w), (x, w))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), (x, w))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
