"""Every shipped config loads strictly and builds a model of the expected size (on the meta device)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from apps.main.train import MainTrainArgs, build_model
from lingua.args import ConfigError, dump_config, load_config, parse_args
from lingua.product_key import value_param_count
from lingua.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIGS = sorted(p for p in (REPO / "apps" / "main" / "configs").glob("*.yaml") if p.stem != "eval")

# Parameters without the token embedding and output head (they depend on the tokenizer), in millions.
EXPECTED_BODY_PARAMS_M = {
    "dense_373m": (290, 320),
    "llama_1B": (1100, 1300),
    "llama_7B": (6300, 6600),
    "pkplus_373m_1024k": (1360, 1390),  # ~300M dense + 1073.7M values (1024^2 x 1024)
    "pk_7b": (10400, 10600),  # ~6.2B dense + 4295M values (1024^2 x 4096)
}
# Value-table parameters (sparse: excluded from MFU) of the product-key configs, in millions.
EXPECTED_VALUE_PARAMS_M = {"pkplus_373m_1024k": 1073.741824, "pk_7b": 4294.967296, "pk_debug": 0.524288}


@pytest.mark.parametrize("path", MAIN_CONFIGS, ids=lambda p: p.stem)
def test_main_config_loads_and_builds(path):
    cfg = load_config(MainTrainArgs, str(path))
    with torch.device("meta"):
        model = build_model(cfg.model, ByteTokenizer())
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_embeddings", "output")))
    if path.stem in EXPECTED_BODY_PARAMS_M:
        low, high = EXPECTED_BODY_PARAMS_M[path.stem]
        assert low <= body / 1e6 <= high, f"{path.stem}: {body / 1e6:.0f}M"
    if path.stem in EXPECTED_VALUE_PARAMS_M:
        assert value_param_count(model) / 1e6 == pytest.approx(EXPECTED_VALUE_PARAMS_M[path.stem])


PUBLIC_CONFIGS = REPO / "tests" / "data" / "public_configs"  # the public Memory Layers configs, only their paths changed


def _public(name: str, tmp_path: Path, *overrides: str) -> MainTrainArgs:
    """A public config through the command line of `python -m apps.main.train`, with its paths in tmp_path."""
    paths = [f"dump_dir={tmp_path / 'run'}", f"data.root_dir={tmp_path / 'data'}", f"data.tokenizer.path={tmp_path / 'sp.model'}"]
    return parse_args(MainTrainArgs, [f"config={PUBLIC_CONFIGS / name}.yaml", *paths, *overrides])


@pytest.mark.parametrize("name", ["pkplus_373m_1024k", "pk_7b"])
def test_public_memory_configs_load(tmp_path, name):
    cfg = _public(name, tmp_path)
    pk = cfg.model.productkey_args
    assert (pk.is_enabled, pk.layers, pk.mem_share_values, pk.mem_n_keys) == (True, "4,12,20", True, 1024)
    assert (pk.mem_heads, pk.mem_knn, pk.mem_k_dim, pk.mem_v_dim) == (4, 32, 512, -1)
    assert (pk.value_fixed_lr, pk.swilu_projection, pk.mem_gated, pk.peer_variant) == (0.001, True, False, False)
    optim = cfg.optim
    assert (optim.lr, optim.warmup, optim.lr_min_ratio, optim.clip, optim.scheduler) == (1e-4, 4000, 0.01, 1.0, "linear")
    assert optim.annealing_step == 10000
    assert (cfg.steps, cfg.seed, cfg.probe_freq) == (128_000, 777, None)
    assert (cfg.data.seq_len, cfg.model.max_seqlen) == (4096, 4096)  # max_seqlen left out: data.seq_len
    assert cfg.data.tokenizer.name == "sp" and cfg.data.sources == {"dclm_baseline_1.0": 1.0}
    assert cfg.distributed.memory_parallel_size == 8 and cfg.checkpoint.dump.every == 10_000
    assert cfg.eval is not None and cfg.eval.dtype == "bf16" and cfg.eval.generator is None
    assert cfg.eval.harness.tasks == ["hellaswag", "piqa", {"task": "nq_open", "num_fewshot": 5}]
    # Our shipped config of the same name is the same run.
    ours = load_config(MainTrainArgs, str(REPO / "apps" / "main" / "configs" / f"{name}.yaml"))
    assert cfg.model == ours.model
    assert cfg.distributed == ours.distributed
    assert dataclasses.replace(cfg.optim, annealing_step=None) == ours.optim
    assert (cfg.data.batch_size, cfg.steps, cfg.name) == (ours.data.batch_size, ours.steps, ours.name)
    # The resolved config is dumped and read back unchanged.
    assert load_config(MainTrainArgs, str(dump_config(cfg, tmp_path / "config.yaml"))) == cfg


def test_max_seqlen_follows_seq_len_unless_set(tmp_path):
    assert _public("pkplus_373m_1024k", tmp_path, "data.seq_len=2048").model.max_seqlen == 2048
    assert _public("pkplus_373m_1024k", tmp_path, "model.max_seqlen=8192").model.max_seqlen == 8192
    with pytest.raises(ConfigError, match="exceeds model.max_seqlen=1024"):
        _public("pkplus_373m_1024k", tmp_path, "model.max_seqlen=1024")


def test_eval_generator_section_sets_our_keys(tmp_path):
    cfg = _public("pk_7b", tmp_path, "eval.generator.dtype=fp32", "eval.generator.max_gen_len=64")
    assert cfg.eval is not None
    assert (cfg.eval.dtype, cfg.eval.harness.max_gen_toks, cfg.eval.generator) == ("fp32", 64, None)
