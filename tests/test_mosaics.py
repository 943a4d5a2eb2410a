"""Memory Mosaics model: the shifted attention, causality, recurrent generation, configs, init, and
a short CPU training run with evaluation (loss by position) and generation from its checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from apps.main.generate import GeneratorArgs
from apps.mosaics.generate import generate_tokens
from apps.mosaics.train import MosaicsTrainArgs, build_model
from lingua.args import ConfigError, load_config
from lingua.mosaics.blocks import shifted_causal_attention
from lingua.mosaics.model import MosaicsArgs, MosaicsLM
from lingua.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "apps" / "mosaics" / "configs").glob("*.yaml") if not p.name.startswith("compare_"))  # compare_*: apps.mosaics.compare configs
VARIANTS = {
    "default": {},
    "post_ln": {"pre_ln": False},
    "attn_only": {"attn_only": True},
    "convs_normalized_2pmem": {"v_fe_type": "linearconv", "v_kernel_size": 3, "k_kernel_size": 2, "pmem_count": 2, "leaky_form": "normalized"},
    "shift2_untied": {"v_shift": 2, "v_fe_type": "linearconv", "v_kernel_size": 3, "weight_tying": False},
}


def tiny_model(dtype=torch.float64, **overrides) -> MosaicsLM:
    fields = {"vocab_size": 50, "dim": 24, "n_layers": 2, "n_heads": 3, "pmem_size": 7, "ic_dropout": 0.0, "hd_dropout": 0.0}
    args = MosaicsArgs(**{**fields, **overrides})
    with torch.device("meta"):
        model = MosaicsLM(args)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model.to(dtype).eval()


def explicit_mask_attention(k, v, shift):
    T = k.shape[2]
    t = torch.arange(T)
    allowed = t[None, :] <= t[:, None] - shift
    scores = (k @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # rows with no visible key give 0
    return weights @ v


@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 2, 33])
def test_shifted_causal_attention_equals_explicit_mask(shift, T):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(shifted_causal_attention(k, v, shift), explicit_mask_attention(k, v, shift), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_logits_at_t_ignore_later_tokens(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 11:] = (changed[:, 11:] + 7) % 50
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :11], after[:, :11])
    assert (before[:, 11:] - after[:, 11:]).abs().max() > 1e-3  # later positions do see the change


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_recurrent_steps_equal_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        state = model.initial_state(2, torch.device("cpu"), torch.float64)
        steps = []
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_generation_equals_full_recomputation():
    model = tiny_model(dtype=torch.float32)
    prompt = [3, 14, 15, 9, 2, 6]
    tokens, step_logits = generate_tokens(model, prompt, GeneratorArgs(max_gen_len=12))
    assert len(tokens) == 12
    sequence = list(prompt)
    with torch.no_grad():
        for i in range(12):
            logits = model(torch.tensor([sequence]))[0, -1]
            torch.testing.assert_close(step_logits[i], logits, rtol=1e-4, atol=1e-4)
            sequence.append(int(logits.argmax()))
    assert sequence[len(prompt):] == tokens


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_leaky_implementations_give_the_same_model(impl):
    reference = tiny_model(leaky_impl="op")
    other = tiny_model(leaky_impl=impl)
    other.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), reference(tokens), rtol=1e-10, atol=1e-10)


def test_training_forward_has_no_graph_break_and_dropout_acts():
    model = tiny_model(dtype=torch.float32, ic_dropout=0.5, skip_tokens=2).train()
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on .item() or any graph break
    torch.manual_seed(0)
    loss = compiled(tokens, tokens)
    loss.backward()
    assert torch.isfinite(loss) and model.layers[0].in_context.key.leaky.theta.grad is not None
    torch.manual_seed(1)
    assert not torch.equal(model(tokens), model(tokens))  # attention dropout is applied in training


def test_public_init_and_to_returns_the_module():
    model = tiny_model(dtype=torch.float32)
    C, H = 24, 3  # tiny_model: dim 24, 3 heads
    assert model.to("cpu") is model
    assert model.output is None and abs(model.tok_embeddings.weight.std().item() - C**-0.5) < 0.02
    block = model.layers[0]
    torch.testing.assert_close(block.in_context.key.leaky.theta.data, torch.linspace(0.5, 5, H) / 10)
    assert torch.all(block.in_context.key.kernel_beta == 0.1) and torch.all(block.persistent.value_beta == -0.05)
    assert 0 <= block.in_context.v_featurizer.mix.min() and block.in_context.v_featurizer.mix.max() <= 1
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    big = MosaicsLM(MosaicsArgs(vocab_size=64, dim=256, n_layers=4, n_heads=4, pmem_size=64))
    big.init_weights()
    assert abs(big.layers[0].in_context.c_proj.weight.std().item() - (256**-0.5) / 2) < 0.002
    assert abs(big.layers[0].persistent.mem_k.std().item() - 64**-0.5) < 0.005


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_on_meta(path):
    cfg = load_config(MosaicsTrainArgs, str(path))
    with torch.device("meta"):
        model = build_model(cfg.model, ByteTokenizer())
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    if path.stem.startswith("babistories_12l"):
        assert body == 12 * 7_079_508 + 768  # the public 12/12/768 model, without its embedding


def test_bad_model_config_names_the_key():
    with pytest.raises(ConfigError, match="model.leaky_chunk_size"):
        MosaicsArgs(leaky_chunk_size=48)
    with pytest.raises(ConfigError, match="model.leaky_chunk_size=128: leaky_impl=op"):
        MosaicsArgs(leaky_chunk_size=128)
    assert MosaicsArgs(leaky_chunk_size=128, leaky_impl="chunked").leaky_chunk_size == 128
    with pytest.raises(ConfigError, match="model.dim"):
        MosaicsArgs(dim=100, n_heads=12)


def test_debug_training_eval_and_generation(tmp_path, monkeypatch):
    """A few steps of the debug config, then eval (JSON + PNG) and generation from the checkpoint."""
    from apps.mosaics import eval as mosaics_eval
    from apps.mosaics.generate import GenerateArgs
    from apps.mosaics.generate import main as generate_main
    from apps.mosaics.train import MODEL_SPEC
    from lingua.evaluation import HarnessArgs
    from lingua.trainer import train

    monkeypatch.chdir(REPO)
    data_dir = tmp_path / "data"
    cfg = load_config(
        MosaicsTrainArgs, str(REPO / "apps/mosaics/configs/debug.yaml"),
        [f"dump_dir={tmp_path / 'run'}", f"data.root_dir={data_dir}", "steps=12", "data.batch_size=4",
         "data.seq_len=64", "data.load_async=false", "validation.every=12", "validation.max_batches=2",
         "checkpoint.dump.every=12", "logging.freq=4", "model.dim=32", "model.pmem_size=16"],
    )
    result = train(cfg, MODEL_SPEC)
    assert result.losses[12] < result.losses[4]
    out = tmp_path / "eval"
    harness = HarnessArgs(tasks=["synthetic_mc", "synthetic_qa"], limit=4, max_gen_toks=4, bootstrap_iters=0)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    report = mosaics_eval.main(
        mosaics_eval.EvalArgs(ckpt=str(tmp_path / "run"), out_dir=str(out), max_batches=2, batch_size=4, harness=harness, max_length=64)
    )
    saved = json.loads((out / "eval.json").read_text())
    curve = saved["sources"]["stories"]["loss_by_position"]
    assert len(curve) == 64 and report["val_loss"] > 0 and (out / "loss_by_position.png").stat().st_size > 0
    assert 0 <= saved["harness"]["eval/synthetic_mc/acc_norm"] <= 1 and "eval/synthetic_qa/exact_match/remove_whitespace" in saved["harness"]
    texts = generate_main(GenerateArgs(ckpt=str(tmp_path / "run"), prompt="Once upon a time", generator=GeneratorArgs(max_gen_len=8)))
    assert len(texts) == 1


def test_step_benchmark_tiny_runs_and_reports():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.mosaics_step", "--tiny", "--warmup", "1", "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity:" in result.stdout and "| ours |" in result.stdout and "tok/s" in result.stdout
