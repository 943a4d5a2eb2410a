"""Every shipped config loads strictly and builds a model of the expected size (on the meta device)."""

from pathlib import Path

import pytest
import torch

from apps.main.train import MainTrainArgs, build_model
from lingua.args import load_config
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


# The public Memory Layers configs (facebookresearch/memory), as published apart from the paths a
# user must fill in (dump_dir, data.root_dir, data.tokenizer.path) and the keys this framework has
# no counterpart for, listed in PUBLIC_KEYS_NOT_SUPPORTED: they are removed here, not silently
# ignored by the loader, which rejects them. The public files also leave model.max_seqlen to be
# derived from data.seq_len, which MainTrainArgs does not do: it is set here.
PUBLIC_KEYS_NOT_SUPPORTED = ("probe_freq", "optim.annealing_step", "eval")
PUBLIC_PKPLUS_373M = """
name: "373_pkplus_1024"
steps: 128_000
probe_freq: null
seed: 777
optim: {lr: 1e-4, warmup: 4000, lr_min_ratio: 0.01, clip: 1.0, scheduler: linear, annealing_step: 10000}
distributed:
    fsdp_type: full_shard
    compile: true
    model_dtype: bf16
    matmul_allow_tf32: false
    selective_activation_checkpointing: false
    tp_size: 1
    memory_parallel_size: 8
model:
    dim: 1024
    n_layers:  24
    n_heads: 16
    rope_theta: 500000.0
    productkey_args:
        is_enabled: True
        layers:  "4,12,20"
        mem_share_values: True
        mem_n_keys: 1024
        value_fixed_lr: 0.001
        swilu_projection: True
        mem_k_dim: 512
data:
    root_dir: data/shuffled
    sources: {dclm_baseline_1.0: 1.0}
    batch_size: 8
    prefetch_size: 64
    seq_len: 4096
    n_views: 2
    load_async: true
    tokenizer: {name: sp}
profiling: {run: true}
checkpoint: {dump: {every: 10000, keep: 1}, eval: {every: 128_000, keep: 1}}
logging: {freq: 10}
eval:
    generator: {max_tokens: 8192, dtype: bf16, temperature: 1.0, top_p: 0.95}
    harness: {tasks: [hellaswag, piqa, {task: nq_open, num_fewshot: 5}]}
"""
PUBLIC_PK_7B_MODEL = """
name: "7B_pkplus_1024"
model:
    dim: 4096
    n_layers: 32
    n_heads: 32
    rope_theta: 100_000
    ffn_dim_multiplier: 1.0
    multiple_of: 256
    productkey_args:
        is_enabled: True
        layers:  "4,12,20"
        mem_share_values: True
        mem_n_keys: 1024
        value_fixed_lr: 0.001
        swilu_projection: True
        mem_k_dim: 512
        mem_heads: 4
        mem_knn: 32
        mem_gated: False
        mem_v_dim: -1
        peer_variant: False
distributed: {compile: false, checkpoint_each_layer: true, memory_parallel_size: 8}
data: {batch_size: 2}
"""


def _public_config(tmp_path, *texts: str) -> Path:
    import yaml

    merged: dict = {}
    for text in texts:
        for key, value in yaml.safe_load(text).items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    for dotted in PUBLIC_KEYS_NOT_SUPPORTED:
        *parents, leaf = dotted.split(".")
        node = merged
        for key in parents:
            node = node[key]
        assert leaf in node, f"{dotted} is no longer in the public config: update PUBLIC_KEYS_NOT_SUPPORTED"
        del node[leaf]
    merged["dump_dir"] = str(tmp_path / "run")
    merged["data"]["root_dir"] = str(tmp_path / "data")
    merged["data"]["tokenizer"]["path"] = str(tmp_path / "tokenizer.model")
    merged["model"]["max_seqlen"] = merged["data"]["seq_len"]
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path


@pytest.mark.parametrize("texts", [(PUBLIC_PKPLUS_373M,), (PUBLIC_PKPLUS_373M, PUBLIC_PK_7B_MODEL)], ids=["pkplus_373m", "pk_7b"])
def test_public_memory_configs_load(tmp_path, texts):
    cfg = load_config(MainTrainArgs, str(_public_config(tmp_path, *texts)))
    ours = load_config(MainTrainArgs, str(REPO / "apps" / "main" / "configs" / ("pk_7b.yaml" if len(texts) > 1 else "pkplus_373m_1024k.yaml")))
    assert cfg.model == ours.model  # our shipped config is the public model, field for field
    assert cfg.optim == ours.optim
    assert cfg.distributed == ours.distributed
    for key in ("steps", "seed", "name"):
        assert getattr(cfg, key) == getattr(ours, key), key
