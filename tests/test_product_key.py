"""Product-key memory layers: exact top-k, float64 gradcheck, init after a meta build, config
validation, FLOPs, usage metrics, and one table shared by three layers through training,
checkpoint, consolidation and reload."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from apps.main.generate import load_model_and_tokenizer
from apps.main.train import MODEL_SPEC, MainTrainArgs, build_model, model_flops_per_token
from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, config_from_dict
from lingua.checkpoint import consolidate, step_dirs
from lingua.metrics import read_metrics
from lingua.optim import OptimArgs, build_optimizer
from lingua.product_key import HashingMemory, MemoryValues, ProductKeyArgs, log_metrics, memory_param_groups, product_key_topk
from lingua.synthetic import write_corpus
from lingua.tokenizer import ByteTokenizer
from lingua.trainer import train

SMALL_PK = dict(is_enabled=True, mem_n_keys=8, mem_heads=2, mem_knn=3, mem_k_dim=8)


def lm_args(**pk) -> LMTransformerArgs:
    return LMTransformerArgs(
        dim=32, n_layers=3, n_heads=2, vocab_size=40, max_seqlen=16, multiple_of=16,
        productkey_args=ProductKeyArgs(**{**SMALL_PK, "layers": "0,1,2", **pk}),
    )


def build_on_meta(args: LMTransformerArgs, seed: int = 0) -> LMTransformer:
    with torch.device("meta"):
        model = LMTransformer(args)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # garbage everywhere: init_weights must overwrite every tensor
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.fill_(float("nan") if tensor.is_floating_point() else 12345)
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("n_tokens,heads,n_keys,knn,k_dim", [(37, 3, 11, 5, 6), (20, 1, 16, 16, 4), (9, 2, 30, 7, 10)])
def test_product_key_topk_equals_exhaustive(n_tokens, heads, n_keys, knn, k_dim):
    gen = torch.Generator().manual_seed(n_keys)
    query = torch.randn(n_tokens, heads, k_dim, generator=gen, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, k_dim // 2, generator=gen, dtype=torch.float64)
    scores, rows = product_key_topk(query, keys, knn)
    half = k_dim // 2
    s1 = torch.einsum("nhc,hmc->nhm", query[..., :half], keys[:, 0])
    s2 = torch.einsum("nhc,hmc->nhm", query[..., half:], keys[:, 1])
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [N, H, n_keys^2], row i1 * n_keys + i2
    ref_scores, ref_rows = all_scores.topk(knn, dim=-1)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-12)
    assert torch.equal(rows, ref_rows)


@pytest.mark.parametrize(
    "pk",
    [
        dict(swilu_projection=True, mem_gated=True),
        dict(swilu_projection=False, mem_v_dim=6, mem_query_batchnorm=True),
        dict(swilu_projection=False, peer_variant=True),
    ],
    ids=["memory_plus_gated", "vproj_batchnorm", "peer"],
)
def test_hashing_memory_gradcheck_float64(pk):
    args = ProductKeyArgs(**{**SMALL_PK, "layers": "0", **pk})
    torch.manual_seed(0)
    layer = HashingMemory(8, args, 0).double()
    layer.init_weights()
    layer.train(False)  # batchnorm uses (initialized) running statistics: a deterministic function
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    class Densify(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad.to_dense() if grad.is_sparse else grad

    def fn(x, *flat):
        state = {n: Densify.apply(p) for n, p in zip(names, flat)}
        return torch.func.functional_call(layer, state, (x,))

    # fast_mode: random projections of the Jacobian (a full one is ~1000 inputs wide).
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def test_value_weight_decay_null_follows_optim_weight_decay():
    """value_weight_decay: null gives the values optim.weight_decay, as the public code does."""
    model = build_on_meta(lm_args(value_weight_decay=None))
    optimizer, _ = build_optimizer(model, OptimArgs(weight_decay=0.07), 10, memory_param_groups(model))
    decay = {group["name"]: group["weight_decay"] for group in optimizer.param_groups}
    assert decay["memory_values"] == 0.07 and decay["decay"] == 0.07
    with pytest.raises(ConfigError, match="value_weight_decay"):
        config_from_dict(ProductKeyArgs, {"value_weight_decay": -0.1})


def test_every_tensor_initialized_after_meta_build():
    model = build_on_meta(lm_args(mem_gated=True, mem_query_batchnorm=True))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
    again = build_on_meta(lm_args(mem_gated=True, mem_query_batchnorm=True))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # init depends on the seed only, not on leftover memory


def test_shared_table_is_registered_once():
    model = build_on_meta(lm_args())
    layers = [block.feed_forward for block in model.layers]
    assert all(isinstance(layer, HashingMemory) and layer.table is model.memory_values for layer in layers)
    table_keys = [k for k in model.state_dict() if k.endswith("weight") and model.state_dict()[k].shape[0] == 64]
    assert table_keys == ["memory_values.weight"]
    assert sum(p is model.memory_values.weight for p in model.parameters()) == 1
    groups = memory_param_groups(model)
    assert len(groups) == 1 and groups[0].params == [model.memory_values.weight] and groups[0].lr == 1e-3
    assert groups[0].weight_decay == 0.0 and groups[0].row_update == "lazy"
    unshared = build_on_meta(lm_args(mem_share_values=False))
    assert unshared.memory_values is None
    assert len({id(block.feed_forward.table) for block in unshared.layers}) == 3
    assert len(memory_param_groups(unshared)[0].params) == 3


def test_config_validation_names_the_key():
    cases = [
        (dict(mem_knn=9), "mem_knn=9 exceeds mem_n_keys=8"),
        (dict(mem_k_dim=7), "mem_k_dim=7 must be even"),
        (dict(layers=""), "needs layers"),
        (dict(layers="1,x"), "comma-separated integers"),
        (dict(layers="1,1"), "twice"),
        (dict(peer_variant=True, mem_v_dim=16), "peer_variant=true needs mem_v_dim=-1"),
        (dict(mem_query_dropout=1.0), r"mem_query_dropout=1.0 must be in \[0, 1\)"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(ProductKeyArgs, {**SMALL_PK, "layers": "1", **fields})
    with pytest.raises(ConfigError, match=r"ids \[3\] are outside the 3 blocks"):
        lm_args(layers="0,3")


@pytest.mark.parametrize("distributed,pk,message", [
    ({"tp_size": 2}, {}, r"distributed.tp_size=2 with model.productkey_args.is_enabled=true: memory layers do not support tensor"),
    ({"memory_parallel_size": 2}, {"zero_copy": True}, r"memory_parallel_size=2 with model.productkey_args.zero_copy=true"),
    ({"memory_parallel_size": 3}, {"mem_v_dim": 16}, r"memory_parallel_size=3 does not divide the value width 16"),
    ({"memory_parallel_size": 3}, {}, r"memory_parallel_size=3 does not divide the value width 32"),
])
def test_memory_layouts_that_cannot_run_are_refused_when_the_config_loads(distributed, pk, message, tmp_path):
    """Before the run writes anything (config.yaml included): memory layers under tensor
    parallelism, zero-copy tables under memory parallelism, a value width P does not divide."""
    raw = {"dump_dir": str(tmp_path / "run"), "distributed": distributed,
           "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "productkey_args": {**SMALL_PK, "layers": "1", **pk}}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(MainTrainArgs, raw)
    assert not (tmp_path / "run").exists()
    raw["model"]["productkey_args"]["is_enabled"] = False  # without memory layers the layout is fine
    config_from_dict(MainTrainArgs, raw)


def test_memory_parallel_size_must_divide_the_processes_before_any_work():
    from lingua.distributed import DistributedArgs, resolve_parallel_sizes

    assert resolve_parallel_sizes(DistributedArgs(memory_parallel_size=2), 4) == (4, 1, 1)
    with pytest.raises(ConfigError, match="memory_parallel_size=2 must divide the 3 processes"):
        resolve_parallel_sizes(DistributedArgs(memory_parallel_size=2), 3)


def test_flops_count_read_rows_not_the_table():
    def flops(n_keys: int) -> tuple[float, LMTransformer]:
        with torch.device("meta"):
            model = LMTransformer(lm_args(mem_n_keys=n_keys))
        return model_flops_per_token(model, 16), model

    small, model = flops(8)
    big, _ = flops(64)
    keys_params = lambda n: 3 * 2 * 2 * n * 4  # layers * 2 halves * heads * n_keys * k_dim/2  # noqa: E731
    assert big - small == pytest.approx(6 * (keys_params(64) - keys_params(8)))  # table 64x larger: only keys count
    reads = 3 * 6 * 2 * 3 * 32  # layers * 6 * heads * knn * v_dim
    dense = model.dense_param_count()
    lookups = model.memory_values.weight.numel() + model.tok_embeddings.weight.numel()
    assert dense == sum(p.numel() for p in model.parameters()) - lookups
    assert small == pytest.approx(6 * dense + 12 * 3 * 32 * 16 / 2 + reads)


def test_usage_metrics_count_and_reset():
    model = build_on_meta(lm_args())
    model(torch.randint(0, 40, (2, 16)))
    metrics = log_metrics(model)
    n_lookups = 2 * 16 * 2 * 3  # tokens * heads * knn
    for layer_id in range(3):
        touched = metrics[f"memory/layer{layer_id}/rows_touched"]
        assert 0 < touched <= min(1.0, n_lookups / 64)
        assert metrics[f"memory/layer{layer_id}/rows_per_forward"] == pytest.approx(touched * 64)
        assert 1 / 64 <= metrics[f"memory/layer{layer_id}/hot1pct_share"] <= 1
    assert metrics["memory/values/rows_touched"] >= metrics["memory/layer0/rows_touched"]
    assert log_metrics(model) == {}  # counters were reset by the read


def test_three_layers_share_train_consolidate_reload(tmp_path: Path):
    data = tmp_path / "data"
    write_corpus(data, "stories", n_train=60, n_val=8, n_chunks=1, seed=0)
    cfg = config_from_dict(
        MainTrainArgs,
        {
            "dump_dir": str(tmp_path / "run"),
            "steps": 6,
            "data": {"root_dir": str(data), "batch_size": 2, "seq_len": 16, "load_async": False, "prefetch_size": 2,
                     "tokenizer": {"name": "bytes"}},
            "model": {"dim": 32, "n_layers": 3, "n_heads": 2, "max_seqlen": 16, "multiple_of": 16,
                      "productkey_args": {**SMALL_PK, "layers": "0,1,2", "value_fixed_lr": 0.05}},
            "optim": {"lr": 1e-2, "warmup": 0},
            "checkpoint": {"dump": {"every": 6, "keep": 1}},
            "logging": {"freq": 3},
        },
    )
    train(cfg, MODEL_SPEC)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records and all(0 < r["memory/values/rows_touched"] <= 1 for r in records)
    folder = step_dirs(tmp_path / "run" / "checkpoints")[-1]
    from_dcp, _, _ = load_model_and_tokenizer(str(folder), device="cpu")
    consolidated = consolidate(folder)
    from_file, _, _ = load_model_and_tokenizer(str(consolidated), device="cpu")
    for model in (from_dcp, from_file):
        assert all(block.feed_forward.table is model.memory_values for block in model.layers)
    fresh = build_on_meta(from_file.args, seed=from_file.args.seed)
    assert not torch.equal(fresh.memory_values.weight, from_file.memory_values.weight)  # the table trained
    tokens = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        logits = from_dcp(tokens)
        assert torch.equal(logits, from_file(tokens))
        assert torch.equal(logits, from_dcp(tokens))  # eval mode: deterministic, values still shared


def test_build_model_from_trainer_config_has_memory_spec():
    cfg = config_from_dict(MainTrainArgs, {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seqlen": 256,
                                                     "productkey_args": {**SMALL_PK, "layers": "1"}}})
    with torch.device("meta"):
        model = build_model(cfg.model, ByteTokenizer())
    assert isinstance(model.layers[1].feed_forward, HashingMemory) and not isinstance(model.layers[0].feed_forward, HashingMemory)
    assert isinstance(model.memory_values, MemoryValues)
    assert MODEL_SPEC.log_metrics is log_metrics
    specs = MODEL_SPEC.param_groups(model, cfg.optim)
    assert [s.name for s in specs] == ["memory_values"]
    assert math.isfinite(model_flops_per_token(model, 256))
    disabled = dataclasses.replace(cfg.model, productkey_args=ProductKeyArgs())
    with torch.device("meta"):
        assert MODEL_SPEC.param_groups(build_model(disabled, ByteTokenizer()), cfg.optim) == []


def test_model_benchmark_tiny_runs_and_reports(capsys):
    from benchmarks import pk_model

    pk_model.main(["--tiny", "--warmup", "0", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| dense |" in out and "| product-key memory |" in out and "tok/s" in out
