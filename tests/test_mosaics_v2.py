"""Memory Mosaics v2: visibility masks (dense and flex), the contextual memories against an explicit
loop, adaptive bandwidth, documents and causality, recurrent steps and generation equal to the full
forward with bounded short-term state, init, configs, the paper's parameter and FLOP counts, and a
short CPU run of the debug config with evaluation and generation from its checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

from apps.main.generate import GeneratorArgs
from apps.mosaics.generate import generate_tokens
from apps.mosaics.train import MosaicsTrainArgs, build_model
from lingua.args import ConfigError, config_from_dict, load_config
from lingua.mosaics.contextual import block_mask, dense_mask, sdpa_read, visible_count
from lingua.mosaics.gated_scan import gated_key_scan_naive
from lingua.mosaics.model import MosaicsArgs
from lingua.mosaics.v2 import MosaicsV2Args, MosaicsV2LM, forward_flops_per_token
from lingua.tokenizer import ByteTokenizer
from lingua.transformer import document_ids, positions_in_documents

REPO = Path(__file__).resolve().parents[1]
BOS, EOS, VOCAB = 1, 2, 50
SMALL_V2 = {"ffn_dim": 40, "short_window": 5, "long_offset_min": 2, "long_offset_max": 6, "long_offset_eval": 3, "key_scan_impl": "chunked", "key_scan_chunk_size": 8}


def tiny_v2(dtype=torch.float64, **v2_overrides) -> MosaicsV2LM:
    args = MosaicsArgs(vocab_size=VOCAB, dim=24, n_layers=2, n_heads=3, version=2, v2=MosaicsV2Args(**{**SMALL_V2, **v2_overrides}))
    with torch.device("meta"):
        model = MosaicsV2LM(args, (BOS, EOS))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model.to(dtype).eval()


def packed_tokens(batch: int, T: int, seed: int) -> torch.Tensor:
    """Random tokens with documents: a BOS in row 0, an EOS in row 1 (when they fit)."""
    tokens = torch.randint(3, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))
    tokens[0, 0] = BOS
    if T > 8:
        tokens[0, T // 2] = BOS
    if batch > 1 and T > 6:
        tokens[1, 5] = EOS
    return tokens


def rule_visible(kind: str, reach: int, t: int, j: int) -> bool:
    """The paper's sets in plain words (0-indexed): short-term t-h+1 .. t-1, long-term .. t-m."""
    return t - reach < j < t if kind == "short" else j <= t - reach


@pytest.mark.parametrize("kind,reach", [("short", 4), ("short", 2), ("long", 3), ("long", 1)])
def test_dense_and_flex_masks_follow_the_rule_within_documents(kind, reach):
    tokens = packed_tokens(2, 21, seed=0)
    doc_ids = document_ids(tokens, BOS, EOS)
    n_BT = visible_count(kind, reach, positions_in_documents(doc_ids))
    mask = dense_mask(kind, reach, doc_ids, n_BT)[:, 0]
    for b in range(2):
        for t in range(21):
            expected = [rule_visible(kind, reach, t, j) and doc_ids[b, t] == doc_ids[b, j] for j in range(21)]
            assert n_BT[b, t] == sum(expected)
            if sum(expected) == 0:
                expected[t] = True  # an empty row reads itself; its output is zeroed by the memory
            assert mask[b, t].tolist() == expected, (b, t)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 21, 8, generator=gen) for _ in range(3))
    from lingua.mosaics.contextual import FlexRead

    flex = FlexRead()
    flex_out = flex(q, k, v, block_mask(kind, reach, doc_ids, n_BT, flex.make_mask))
    torch.testing.assert_close(flex_out, sdpa_read(q, k, v, mask[:, None]), rtol=1e-5, atol=1e-5)


def test_bandwidth_formula_caps_and_finite_gradient_at_zero_pairs():
    memory = tiny_v2().layers[0].short
    bandwidth = memory.bandwidth
    n = torch.tensor([0.0, 1.0, 8.0, 1000.0], dtype=torch.float64)
    init = math.exp(1.5)
    torch.testing.assert_close(bandwidth(n)[:, 0], init * n.clamp(min=1) ** (1 / 3) + init)
    with torch.no_grad():
        bandwidth.theta0.fill_(20.0), bandwidth.theta1.fill_(-1.0), bandwidth.theta_alpha.fill_(-3.0)
    torch.testing.assert_close(bandwidth(n)[:, 1], math.exp(-1.0) * n.clamp(min=1) + math.exp(10.0))
    bandwidth(n).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in bandwidth.parameters())


def explicit_memory(memory, x_BTC, doc_ids, reach):
    """y_t = sum_{j visible} softmax_j(beta(n_t) k_t . k_j) v_j as loops; 0 where nothing is visible."""
    B, T, C = x_BTC.shape
    H, D = memory.n_heads, C // memory.n_heads
    kf, vf, gate, decay = memory.proj(x_BTC).split([C, C, H, H], dim=-1)
    starts = positions_in_documents(doc_ids) == 0
    keys = gated_key_scan_naive(kf, gate, -decay.abs(), starts, memory.l2_eps).view(B, T, H, D)
    vf = vf.view(B, T, H, D)
    out = torch.zeros(B, T, H, D, dtype=x_BTC.dtype)
    for b in range(B):
        for h in range(H):
            gamma = memory.value_mix[h]
            scale = torch.exp(memory.value_log_scale[h].abs())
            for t in range(T):
                pairs = [j for j in range(T) if rule_visible(memory.kind, reach, t, j) and doc_ids[b, j] == doc_ids[b, t]]
                if not pairs:
                    continue
                beta = torch.exp(memory.bandwidth.theta1[h]) * len(pairs) ** memory.bandwidth.theta_alpha[h].abs() + torch.exp(memory.bandwidth.theta0[h])
                scores = torch.stack([beta * keys[b, t, h] @ keys[b, j, h] for j in pairs])
                values = []
                for j in pairs:
                    mixed = gamma * vf[b, j, h] + (1 - gamma) * vf[b, j + 1, h]  # j < t < T: j + 1 exists
                    values.append(scale * mixed / (mixed.norm() + memory.l2_eps))
                out[b, t, h] = scores.softmax(0) @ torch.stack(values)
    return out.flatten(2)


@pytest.mark.parametrize("kind", ["short", "long"])
def test_contextual_memory_equals_explicit_loops(kind):
    model = tiny_v2()
    memory = model.layers[0].short if kind == "short" else model.layers[0].long
    tokens = packed_tokens(2, 17, seed=2)
    context = model.context(tokens)
    x = torch.randn(2, 17, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reach = SMALL_V2["short_window"] if kind == "short" else SMALL_V2["long_offset_eval"]
    view = context.short if kind == "short" else context.long
    with torch.no_grad():
        torch.testing.assert_close(memory(x, view, context), explicit_memory(memory, x, document_ids(tokens, BOS, EOS), reach), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("long_term", [True, False])
def test_logits_ignore_later_tokens_and_other_documents(long_term):
    model = tiny_v2(long_term=long_term)
    tokens = packed_tokens(1, 24, seed=4)  # documents start at 0 and 12
    with torch.no_grad():
        before = model(tokens)
        later = tokens.clone()
        later[:, 18:] = (later[:, 18:] + 7) % (VOCAB - 3) + 3
        assert torch.equal(model(later)[:, :18], before[:, :18])
        earlier_doc = tokens.clone()
        earlier_doc[:, 1:12] = (earlier_doc[:, 1:12] + 5) % (VOCAB - 3) + 3
        changed = model(earlier_doc)
    assert torch.equal(changed[:, 12:], before[:, 12:])  # the second document never sees the first
    assert (changed[:, 1:12] - before[:, 1:12]).abs().max() > 1e-3


@pytest.mark.parametrize("long_term", [True, False])
def test_recurrent_steps_equal_full_forward_with_bounded_short_term_state(long_term):
    model = tiny_v2(long_term=long_term)
    T = 23
    tokens = packed_tokens(2, T, seed=5)
    with torch.no_grad():
        full = model(tokens)
        state = model.initial_state(2, torch.device("cpu"), torch.float64)
        steps = []
        for t in range(T):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    short = state.layers[0][0]
    assert short.recent_keys.shape[2] == SMALL_V2["short_window"] - 1 and short.old_keys.shape[2] == 0
    if long_term:
        long = state.layers[0][1]
        m = SMALL_V2["long_offset_eval"]
        assert long.recent_keys.shape[2] == m - 1 and long.old_keys.shape[2] == T - m  # pairs 0 .. T-1-m


def test_generation_equals_full_forward_argmax():
    model = tiny_v2(dtype=torch.float32)
    prompt = [BOS, 14, 15, 9, EOS, 6, 7]  # two documents in the prompt
    tokens, step_logits = generate_tokens(model, prompt, GeneratorArgs(max_gen_len=10))
    sequence = list(prompt)
    with torch.no_grad():
        for i in range(len(tokens)):
            logits = model(torch.tensor([sequence]))[0, -1]
            torch.testing.assert_close(step_logits[i], logits, rtol=1e-4, atol=1e-4)
            sequence.append(int(logits.argmax()))
    assert len(tokens) == 10 and sequence[len(prompt):] == tokens


def test_training_draws_m_compiles_without_graph_break_and_reaches_every_parameter():
    model = tiny_v2(dtype=torch.float32).train()
    draws = {int(model.long_offset(torch.device("cpu"))) for _ in range(200)}
    assert draws == set(range(SMALL_V2["long_offset_min"], SMALL_V2["long_offset_max"] + 1))
    assert int(model.eval().long_offset(torch.device("cpu"))) == SMALL_V2["long_offset_eval"]
    model.train()
    tokens = packed_tokens(2, 33, seed=6)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss = compiled(tokens, tokens)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_forward_runs_far_beyond_the_windows():
    model = tiny_v2(dtype=torch.float32)
    tokens = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


def test_paper_init():
    args = MosaicsArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, version=2, v2=MosaicsV2Args(ffn_dim=512))
    model = MosaicsV2LM(args)
    model.init_weights()
    C, F = 256, 512
    checks = [(model.tok_embeddings.weight, (2 * C) ** -0.5), (model.output.weight, (2 * C) ** -0.5)]
    for layer_id, block in enumerate(model.layers):
        std = (2 * C * (layer_id + 1)) ** -0.5
        checks += [(block.short.proj.weight, std), (block.long.proj.weight, std), (block.memory_out.weight, std),
                   (block.feed_forward.w1.weight, std), (block.feed_forward.w3.weight, std),
                   (block.feed_forward.w2.weight, (2 * F * (layer_id + 1)) ** -0.5)]
    for weight, std in checks:
        assert weight.abs().max() <= 3 * std + 1e-7  # truncated at 3 sigma
        assert abs(weight.std().item() / std - 0.986) < 0.03  # the std of a normal truncated at 3 sigma: 0.986 sigma
    memory = model.layers[1].long
    assert torch.all(memory.bandwidth.theta0 == 1.5) and torch.all(memory.bandwidth.theta1 == 1.5)
    assert torch.allclose(memory.bandwidth.theta_alpha, torch.full((4,), 1 / 3)) and torch.all(memory.value_log_scale == 0)
    assert 0 <= memory.value_mix.min() and memory.value_mix.max() <= 1


@pytest.mark.parametrize("long_term,params,flops", [(True, 9.9e9, 18.9e9), (False, 8.3e9, 15.6e9)])
def test_v2_large_counts_the_papers_parameters_and_flops(long_term, params, flops):
    cfg = load_config(MosaicsTrainArgs, str(REPO / "apps/mosaics/configs/v2_large.yaml"), [f"model.v2.long_term={str(long_term).lower()}"])
    assert cfg.model.vocab_size == 128_256
    with torch.device("meta"):
        model = build_model(cfg.model, ByteTokenizer())
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e8) * 1e8 == pytest.approx(params)
    assert round(forward_flops_per_token(model, 256) / 1e8) * 1e8 == pytest.approx(flops)


def test_v2_configs_choose_the_papers_recipe():
    small = load_config(MosaicsTrainArgs, str(REPO / "apps/mosaics/configs/v2_small.yaml"))
    large = load_config(MosaicsTrainArgs, str(REPO / "apps/mosaics/configs/v2_large.yaml"))
    assert (small.model.n_layers, small.model.dim, small.model.n_heads, small.model.v2.resolved_ffn_dim(small.model.dim)) == (24, 2048, 16, 6144)
    assert (large.model.n_layers, large.model.dim, large.model.n_heads, large.model.v2.ffn_dim) == (32, 4096, 32, 14336)
    for cfg, lr in ((small, 3e-4), (large, 1e-3)):
        o = cfg.optim
        assert (cfg.model.version, cfg.data.seq_len, o.lr, o.beta1, o.beta2, o.weight_decay, o.clip, o.warmup) == (2, 4096, lr, 0.9, 0.95, 0.1, 1.0, 2000)
        assert o.scheduler == "cosine" and o.lr_min_ratio == pytest.approx(0.01)


def test_bad_v2_settings_name_the_key():
    with pytest.raises(ConfigError, match="model.pmem_size has no effect with model.version=2"):
        MosaicsArgs(version=2, pmem_size=10)
    with pytest.raises(ConfigError, match="model.v2 settings have no effect with model.version=1"):
        MosaicsArgs(v2=MosaicsV2Args(short_window=8))
    with pytest.raises(ConfigError, match="model.version=3"):
        config_from_dict(MosaicsTrainArgs, {"model": {"version": 3}})
    with pytest.raises(ConfigError, match="model.v2.short_window"):
        config_from_dict(MosaicsTrainArgs, {"model": {"version": 2, "v2": {"short_window": 1}}})
    with pytest.raises(ConfigError, match="model.v2.long_offset_min"):
        MosaicsV2Args(long_offset_min=10, long_offset_max=5)
    with pytest.raises(ConfigError, match="model.v2.key_scan_chunk_size=48"):
        MosaicsV2Args(key_scan_chunk_size=48)


def test_v2_debug_training_eval_and_generation(tmp_path, monkeypatch):
    """A few steps of v2_debug through the one training loop, then eval and generation from the checkpoint."""
    from apps.mosaics import eval as mosaics_eval
    from apps.mosaics.generate import GenerateArgs
    from apps.mosaics.generate import main as generate_main
    from apps.mosaics.train import MODEL_SPEC
    from lingua.trainer import train

    monkeypatch.chdir(REPO)
    cfg = load_config(
        MosaicsTrainArgs, str(REPO / "apps/mosaics/configs/v2_debug.yaml"),
        [f"dump_dir={tmp_path / 'run'}", f"data.root_dir={tmp_path / 'data'}", "steps=12", "data.batch_size=4",
         "data.seq_len=64", "data.load_async=false", "validation.every=12", "validation.max_batches=2",
         "checkpoint.dump.every=12", "logging.freq=4", "model.dim=32", "model.v2.ffn_dim=64"],
    )
    result = train(cfg, MODEL_SPEC)
    assert result.losses[12] < result.losses[4]
    out = tmp_path / "eval"
    report = mosaics_eval.main(mosaics_eval.EvalArgs(ckpt=str(tmp_path / "run"), out_dir=str(out), max_batches=2, batch_size=4, seq_len=128))
    curve = json.loads((out / "eval.json").read_text())["sources"]["stories"]["loss_by_position"]
    assert len(curve) == 128 and math.isfinite(report["val_loss"])  # twice the training length
    texts = generate_main(GenerateArgs(ckpt=str(tmp_path / "run"), prompt="Once upon a time", generator=GeneratorArgs(max_gen_len=8)))
    assert len(texts) == 1
