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


# The OptimArgs options under which lingua updates parameters the way the public Memory Layers code does.
REFERENCE_UPDATE_RULE = dict(warmup_from_zero=True, decay_norms_and_biases=True, decay_embeddings=True, clip_value_groups_separately=True)
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
    # Our shipped config of the same name is the same run, with the public code's update rule switched on.
    ours = load_config(MainTrainArgs, str(REPO / "apps" / "main" / "configs" / f"{name}.yaml"))
    reference_values = dataclasses.replace(pk, value_update="dense", value_weight_decay=None)
    assert dataclasses.replace(cfg.model, productkey_args=reference_values) == ours.model
    assert cfg.distributed == ours.distributed
    assert dataclasses.replace(cfg.optim, annealing_step=None, **REFERENCE_UPDATE_RULE) == ours.optim
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


def test_pkplus_config_updates_like_the_public_code(tmp_path):
    """pkplus_373m_1024k.yaml (at a tiny shape) against the public code's update rule written out
    with torch: one fused AdamW over every parameter with weight decay 0.1 (values at their own lr,
    dense gradients), lr * step / warmup then linear decay for both groups, and the values and the
    rest each clipped to optim.clip by torch's clip_grad_norm_."""
    import copy

    from apps.main.train import param_groups
    from lingua.optim import build_optimizer, clip_gradients

    shape = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.multiple_of=16", "model.productkey_args.layers=1",
             "model.productkey_args.mem_n_keys=8", "model.productkey_args.mem_heads=2", "model.productkey_args.mem_knn=4",
             "model.productkey_args.mem_k_dim=8", "data.seq_len=16", "data.tokenizer.name=bytes", "steps=6", "optim.warmup=2"]
    config = REPO / "apps" / "main" / "configs" / "pkplus_373m_1024k.yaml"
    cfg = parse_args(MainTrainArgs, [f"config={config}", f"dump_dir={tmp_path}", *shape])
    torch.manual_seed(0)
    model = build_model(cfg.model, ByteTokenizer())
    model.init_weights()
    reference = copy.deepcopy(model)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.steps, param_groups(model, cfg.optim))

    values = [reference.memory_values.weight]
    others = [p for p in reference.parameters() if p is not values[0]]
    warmup, n_steps, min_ratio = 2, 6, 0.01

    def public_lr(step: int) -> float:  # the public code's linear schedule
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / (n_steps - warmup)
        return progress * min_ratio + (1 - progress)

    ref_optimizer = torch.optim.AdamW(
        [{"params": others, "lr": 1e-4}, {"params": values, "lr": 1e-3}], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False
    )
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, public_lr)
    tokens = torch.randint(0, 258, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(n_steps):
        for net in (model, reference):
            (50 * net(tokens[:, :-1], tokens[:, 1:])).backward()  # large enough that both parts are clipped
        values[0].grad = values[0].grad.to_dense()
        assert torch.nn.utils.clip_grad_norm_(values, 1.0) > 1 and torch.nn.utils.clip_grad_norm_(others, 1.0) > 1
        clip_gradients(model.parameters(), optimizer, cfg.optim)
        for opt, sched in ((optimizer, scheduler), (ref_optimizer, ref_scheduler)):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
