"""Tests of lingua/transformer.py and apps/main/transformer.py: meta-device init, RoPE, document
masks, GQA, causality, weight tying and a tiny overfit run, each against independent math."""

from __future__ import annotations

import logging
import math
from typing import Iterator

import pytest
import torch
from torch import nn

from apps.main.transformer import LMTransformer, LMTransformerArgs, cross_entropy
from lingua.args import ConfigError
from lingua.optim import OptimArgs, build_optimizer
from lingua.transformer import (
    Attention,
    BaseTransformerArgs,
    RotaryEmbedding,
    apply_rotary_emb,
    document_ids,
    ffn_hidden_dim,
    flops_per_token,
    positions_in_documents,
)

VOCAB = 37


BOS, EOS = 1, 2  # document delimiters of the test vocabulary


def tiny_args(**overrides: object) -> LMTransformerArgs:
    fields = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seqlen=64, multiple_of=16)
    fields.update(overrides)
    return LMTransformerArgs(**fields)


def build(args: LMTransformerArgs, seed: int = 0) -> LMTransformer:
    """The production path: meta build, to_empty, init_weights."""
    with torch.device("meta"):
        model = LMTransformer(args, document_delimiters=(BOS, EOS))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE with complex numbers: pair (x[2i], x[2i+1]) times exp(i * pos * theta^(-2i/D)). x [S, H, D]."""
    dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotation = torch.polar(torch.ones(len(positions), dim // 2, dtype=torch.float64), positions[:, None] * freqs)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).float()


# ---------------------------------------------------------------------------------------------
# Initialization


@pytest.mark.parametrize("weight_tying", [False, True])
def test_meta_build_initializes_every_parameter_and_buffer(weight_tying: bool) -> None:
    args = tiny_args(weight_tying=weight_tying, rope_theta=500.0)
    with torch.device("meta"):
        model = LMTransformer(args)
    model.to_empty(device="cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.fill_(float("nan"))
    model.init_weights()
    assert {n for n, _ in model.named_buffers()} == {"rope_embeddings.cos", "rope_embeddings.sin"}
    for name, tensor in tensors.items():
        assert torch.isfinite(tensor).all(), f"{name} left uninitialized"
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    # The RoPE tables match an independent computation.
    positions = torch.arange(args.max_seqlen, dtype=torch.float64)
    freqs = 500.0 ** (-torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    angles = positions[:, None] * freqs
    torch.testing.assert_close(model.rope_embeddings.cos, angles.cos().float())
    torch.testing.assert_close(model.rope_embeddings.sin, angles.sin().float())


def test_init_std_matches_target() -> None:
    dim, n_layers = 512, 3
    args = LMTransformerArgs(dim=dim, n_layers=n_layers, n_heads=8, vocab_size=1000, init_std_factor="global_depth")
    model = build(args)
    # A normal truncated at +-3 sigma keeps this fraction of its std.
    alpha = 3.0
    pdf = math.exp(-(alpha**2) / 2) / math.sqrt(2 * math.pi)
    trunc = math.sqrt(1 - 2 * alpha * pdf / math.erf(alpha / math.sqrt(2)))
    depth = math.sqrt(2 * (n_layers + 1))
    hidden = 1536  # int(2 * 4 * 512 / 3) = 1365, rounded up to a multiple of 256
    block = model.layers[1]
    expected = {
        block.attention.wq.weight: dim**-0.5,
        block.attention.wk.weight: dim**-0.5,
        block.feed_forward.w1.weight: dim**-0.5,
        block.attention.wo.weight: dim**-0.5 / depth,
        block.feed_forward.w2.weight: hidden**-0.5 / depth,
        model.tok_embeddings.weight: dim**-0.5,
        model.output.weight: dim**-0.5,
    }
    assert block.feed_forward.w2.weight.shape == (dim, hidden)
    for weight, sigma in expected.items():
        assert weight.std().item() == pytest.approx(sigma * trunc, rel=0.03)
        assert weight.abs().max().item() <= 3 * sigma + 1e-6


def test_init_base_std_overrides_fan_in() -> None:
    model = build(tiny_args(dim=256, n_heads=4, n_kv_heads=None, init_base_std=0.02, multiple_of=256))
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02 * 0.9866, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 * 0.9866, rel=0.05)


def test_ffn_hidden_dim_closed_form() -> None:
    assert ffn_hidden_dim(256, 256, None) == 768  # int(2048/3) = 682 -> 768
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # the Llama 3 8B width


def test_replaceable_ffn() -> None:
    class Doubler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

        def init_weights(self) -> None:
            nn.init.constant_(self.scale, 2.0)

    with torch.device("meta"):
        model = LMTransformer(tiny_args(), ffn_for_layer=lambda i: Doubler() if i == 1 else None)
    model.to_empty(device="cpu")
    model.init_weights()
    assert isinstance(model.layers[1].feed_forward, Doubler)
    assert model.layers[1].feed_forward.scale.item() == 2.0
    assert hasattr(model.layers[0].feed_forward, "w1")
    with pytest.raises(TypeError, match="init_weights"):
        LMTransformer(tiny_args(), ffn_for_layer=lambda i: nn.Identity())


def test_args_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="n_heads"):
        BaseTransformerArgs(dim=100, n_heads=8)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        BaseTransformerArgs(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="head_dim"):
        BaseTransformerArgs(dim=24, n_heads=8)  # head_dim 3 is odd
    with pytest.raises(ConfigError, match="vocab_size"):
        LMTransformer(LMTransformerArgs())
    assert BaseTransformerArgs(dim=100, n_heads=8, head_dim=16).resolved_head_dim == 16


# ---------------------------------------------------------------------------------------------
# RoPE


def test_rope_matches_complex_rotation_and_is_relative() -> None:
    torch.manual_seed(0)
    head_dim, theta = 16, 10000.0
    rope = RotaryEmbedding(head_dim, 32, theta)
    x = torch.randn(32, 3, head_dim)
    cos, sin = rope(32)
    rotated = apply_rotary_emb(x.unsqueeze(0), cos, sin)[0]
    torch.testing.assert_close(rotated, reference_rope(x, torch.arange(32.0, dtype=torch.float64), theta))

    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m: int, n: int) -> float:
        q_rot = apply_rotary_emb(q.view(1, 1, 1, -1), cos[m : m + 1], sin[m : m + 1])
        k_rot = apply_rotary_emb(k.view(1, 1, 1, -1), cos[n : n + 1], sin[n : n + 1])
        return (q_rot * k_rot).sum().item()

    assert score(5, 2) == pytest.approx(score(30, 27), abs=1e-5)
    assert score(3, 3) == pytest.approx(torch.dot(q, k).item(), abs=1e-5)
    assert score(9, 0) != pytest.approx(score(9, 1), abs=1e-3)


def test_tok_idx_positions_restart_per_document() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0]])
    assert torch.equal(positions_in_documents(doc_ids), expected)
    rope = RotaryEmbedding(8, 16, 10000.0)
    cos, sin = rope(9, expected)
    assert cos.shape == (2, 9, 4)
    torch.testing.assert_close(cos[0, 3:5], rope.cos[:2])


def test_model_uses_tok_idx() -> None:
    """RoPE is relative: shifting every position changes nothing, other positions change the output."""
    model = build(tiny_args())
    tokens = torch.randint(0, VOCAB, (2, 12))
    default = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        base = model(tokens)
        torch.testing.assert_close(model(tokens, tok_idx=default + 9), base, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(tokens, tok_idx=default * 2), base, atol=1e-3)


def test_document_ids_from_bos_and_eos() -> None:
    bos, eos = 1, 2
    tokens = torch.tensor([[1, 5, 6, 2, 1, 7, 2, 8, 9, 1, 3]])
    assert document_ids(tokens, bos_id=bos, eos_id=eos).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]]
    assert document_ids(tokens, eos_id=eos).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]
    with pytest.raises(ValueError):
        document_ids(tokens)


# ---------------------------------------------------------------------------------------------
# Attention: document masks, GQA, causality


def packed_vs_separate(attn_impl: str) -> None:
    args = tiny_args(attn_impl=attn_impl, doc_mask=True)
    model = build(args)
    plain = build(tiny_args(attn_impl="sdpa"))
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    lengths = [[5, 9, 3], [17]]
    docs = [[torch.randint(3, VOCAB, (n,)) for n in row] for row in lengths]
    tokens = torch.stack([torch.cat(row) for row in docs])
    doc_ids = torch.stack([torch.cat([torch.full((len(d),), i) for i, d in enumerate(row)]) for row in docs])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = plain(doc.unsqueeze(0))[0]
                torch.testing.assert_close(packed[b, start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
                start += len(doc)
    # Without the mask the packed documents do see each other.
    with torch.no_grad():
        assert not torch.allclose(plain(tokens)[0, 5:14], packed[0, 5:14], atol=1e-3)


def test_doc_mask_sdpa_equals_separate_documents() -> None:
    packed_vs_separate("sdpa")


def test_doc_mask_flex_forward_equals_separate_documents() -> None:
    packed_vs_separate("flex_attention")


def test_doc_mask_xformers_equals_separate_documents() -> None:
    pytest.importorskip("xformers")
    if not torch.cuda.is_available():
        pytest.skip("xformers kernels need CUDA")
    packed_vs_separate("xformers")


def test_xformers_missing_gives_clear_error() -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="xformers"):
            LMTransformer(tiny_args(attn_impl="xformers"))
    else:
        pytest.skip("xformers is installed")


def test_doc_mask_finds_documents_from_delimiters() -> None:
    with pytest.raises(ConfigError, match="doc_mask"):
        LMTransformer(tiny_args(doc_mask=True))
    model = build(tiny_args(doc_mask=True))
    tokens = torch.tensor([[BOS, 5, 6, EOS, BOS, 7, 8, 9, EOS, BOS, 4]])
    with torch.no_grad():
        found = model(tokens)
        given = model(tokens, doc_ids=document_ids(tokens, BOS, EOS))
        unmasked = build(tiny_args())(tokens)
    torch.testing.assert_close(found, given)
    assert not torch.allclose(found, unmasked, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["sdpa", "flex_attention"])
def test_gqa_equals_explicit_repeat(attn_impl: str) -> None:
    torch.manual_seed(0)
    args = tiny_args(attn_impl=attn_impl, n_heads=6, n_kv_heads=2)
    model = build(args)
    block = model.layers[0]
    attn: Attention = block.attention
    seqlen, head_dim = 11, args.resolved_head_dim
    x = torch.randn(2, seqlen, args.dim)
    cos, sin = model.rope_embeddings(seqlen)
    with torch.no_grad():
        mask = model.attn_backend.build_mask(seqlen, None, x.device)
        out = attn(x, (cos, sin), mask, model.attn_backend)
        # Reference: each query head h uses kv head h // 3, explicit softmax with a causal mask.
        q = apply_rotary_emb((x @ attn.wq.weight.T).unflatten(-1, (6, head_dim)), cos, sin)
        k = apply_rotary_emb((x @ attn.wk.weight.T).unflatten(-1, (2, head_dim)), cos, sin)
        v = (x @ attn.wv.weight.T).unflatten(-1, (2, head_dim))
        heads = []
        future = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1)
        for h in range(6):
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // 3]) / math.sqrt(head_dim)
            weights = scores.masked_fill(future, float("-inf")).softmax(-1)
            heads.append(torch.einsum("bqk,bkd->bqd", weights, v[:, :, h // 3]))
        expected = torch.cat(heads, dim=-1) @ attn.wo.weight.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "flex_attention"])
def test_causal_future_tokens_do_not_change_past_outputs(attn_impl: str) -> None:
    model = build(tiny_args(attn_impl=attn_impl))
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_flex_training_on_cpu_falls_back_to_sdpa_once(caplog: pytest.LogCaptureFixture) -> None:
    model = build(tiny_args(attn_impl="flex_attention"))
    sdpa = build(tiny_args())
    sdpa.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 9))
    with caplog.at_level(logging.WARNING, logger="lingua.transformer"):
        loss = model(tokens, tokens)
        loss.backward()
        model(tokens, tokens)
    assert sum("no backward on CPU" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(loss, sdpa(tokens, tokens))


# ---------------------------------------------------------------------------------------------
# LM: weight tying, loss, flops, overfit


def test_weight_tying_one_parameter_gradients_and_state_dict() -> None:
    tied = build(tiny_args(weight_tying=True))
    assert tied.output is None
    n_untied = sum(p.numel() for p in build(tiny_args()).parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - VOCAB * 48
    # The tied gradient is the sum of the embedding-path and head-path gradients of an untied copy.
    untied = build(tiny_args())
    untied.load_state_dict(tied.state_dict() | {"output.weight": tied.tok_embeddings.weight.detach().clone()})
    tokens = torch.randint(0, VOCAB, (2, 10))
    loss_tied, loss_untied = tied(tokens, tokens), untied(tokens, tokens)
    torch.testing.assert_close(loss_tied, loss_untied)
    loss_tied.backward()
    loss_untied.backward()
    torch.testing.assert_close(
        tied.tok_embeddings.weight.grad, untied.tok_embeddings.weight.grad + untied.output.weight.grad
    )
    # State dict round trip.
    state = tied.state_dict()
    assert "output.weight" not in state
    restored = build(tiny_args(weight_tying=True), seed=5)
    restored.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens), tied(tokens))


def test_cross_entropy_is_fp32_mean_with_ignore_index() -> None:
    logits = torch.randn(2, 3, 5).bfloat16()
    target = torch.tensor([[0, 4, -100], [2, -100, 1]])
    expected = -sum(
        torch.log_softmax(logits[b, t].float(), -1)[target[b, t]] for b, t in [(0, 0), (0, 1), (1, 0), (1, 2)]
    ) / 4
    loss = cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_dense_param_count_and_flops() -> None:
    args = tiny_args()
    model = build(args)
    total = sum(p.numel() for p in model.parameters())
    assert model.dense_param_count() == total - VOCAB * 48
    assert build(tiny_args(weight_tying=True)).dense_param_count() == total - VOCAB * 48
    assert flops_per_token(1000, 2, 48, 64) == 6 * 1000 + 6 * 2 * 48 * 64


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and spinning threads on a busy 2-core machine slow
    the 60 training steps down more than tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_overfits_fixed_batch(one_thread: None) -> None:
    torch.manual_seed(0)
    model = build(tiny_args(dim=64, n_heads=4, n_kv_heads=None))
    optimizer, scheduler = build_optimizer(model, OptimArgs(lr=1e-2, warmup=5, scheduler="constant"), n_steps=60)
    tokens = torch.randint(0, VOCAB, (4, 33))
    losses = []
    for _ in range(60):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # logits start with std ~1 (unit-rms hidden state, head std dim^-0.5): loss ~ ln V + 1/2.
    assert math.log(VOCAB) < losses[0] < math.log(VOCAB) + 1
    assert losses[-1] < 0.1 * losses[0]
