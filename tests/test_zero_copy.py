"""Zero-copy values: the row kernels (Triton interpreter on CPU, compiled on a GPU) against their
torch reference; the zero-copy table against a table on the compute device (outputs, both
gradients, updated rows, untouched rows and state bit-identical); device moves leave the table in
host memory; an exact checkpoint round trip; the configuration checks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from apps.main.generate import load_model_and_tokenizer
from apps.main.train import MODEL_SPEC, MainTrainArgs, check_host_memory
from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, config_from_dict
from lingua.checkpoint import consolidate, step_dirs
from lingua.optim import AdamW, OptimArgs, RowStep, build_optimizer, clip_grad_norm, grad_of
from lingua.product_key import ProductKeyArgs, ZeroCopyValues, memory_param_groups
from lingua.product_key.embedding_bag import naive as bag_naive
from lingua.product_key.embedding_bag import triton_bag, weighted_embedding_bag
from lingua.product_key.zero_copy import capacity, dedup_rows, host, kernels, naive
from lingua.synthetic import write_corpus
from lingua.trainer import train

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
BF16_ULP = dict(rtol=2**-7, atol=0)  # the interpreter rounds fp32 -> bf16 toward zero, GPUs to nearest


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, expected, **BF16_ULP)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dim", [37, 1])  # 1: per-row optimizer state
def test_gather_kernel_matches_reference(dim, device):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, dim, generator=gen).to(device)
    rows = torch.randint(0, 50, (41,), generator=gen)
    rows[::4] = -1  # empty slots give zeros
    rows = rows.to(device)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert_same(kernels.gather_rows_triton(table, rows, out_dtype), naive.gather_rows(table, rows, out_dtype))
    low = table.to(torch.bfloat16)
    assert torch.equal(kernels.gather_rows_triton(low, rows, torch.float32), naive.gather_rows(low, rows, torch.float32))


@pytest.mark.parametrize("dim", [21, 1])
def test_scatter_kernel_matches_reference(dim, device):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(40, dim, generator=gen).to(device)
    rows = torch.randperm(40, generator=gen)[:19].to(device)
    values = torch.randn(19, dim, generator=gen).to(device)
    ours = table.clone()
    kernels.scatter_rows_triton(ours, rows, values)
    naive.scatter_rows(table, rows, values)
    assert torch.equal(ours, table)


@pytest.mark.parametrize("rule,with_low_precision", [("lazy", True), ("lazy", False), ("rowwise_adagrad", True)])
def test_update_kernel_matches_reference(rule, with_low_precision, device):
    """The fused row update (read, step, write each row once) against read + row_update_ + write."""
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(60, 33, generator=gen).to(device)
    moments = (torch.randn(60, 33, generator=gen) * 0.1, torch.rand(60, 33, generator=gen) * 0.1) if rule == "lazy" else None
    moments = tuple(m.to(device) for m in moments) if moments else None
    low = table.to(torch.bfloat16) if with_low_precision else None
    rows = torch.randperm(60, generator=gen)[:23].to(device)
    grads = torch.randn(23, 33, generator=gen).to(device)
    first = (torch.rand(23, generator=gen) + 0.5).to(device)
    second = (torch.rand(23, generator=gen) + 0.5).to(device) if rule == "lazy" else None
    rule_fields = {"bias_correction1": first, "bias_correction2_sqrt": second} if rule == "lazy" else {"adagrad_denominator": first}
    step = RowStep(rows, grads, lr=3e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, **rule_fields)
    copies = [tuple(t.clone() for t in moments) if moments else None for _ in range(2)]
    original = table.clone()
    ours, ours_low = table.clone(), None if low is None else low.clone()
    kernels.update_rows_triton(ours, ours_low, copies[0], step)
    naive.update_rows(table, low, copies[1], step)
    torch.testing.assert_close(ours, table, rtol=1e-6, atol=1e-7)
    untouched = ~torch.isin(torch.arange(60, device=device), rows)
    assert torch.equal(ours[untouched], original[untouched]) and (ours[rows] != original[rows]).all()
    if moments:
        for got, expected in zip(copies[0], copies[1]):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if low is not None:
        torch.testing.assert_close(ours_low, low, **BF16_ULP)


def test_dedup_rows_without_host_sync_semantics():
    rows = torch.tensor([7, 3, 7, 7, 0, 3, 9, 0])
    slot_rows, inverse, n_unique = dedup_rows(rows, n_rows=10)
    assert slot_rows.tolist() == [0, 3, 7, 9, -1, -1, -1, -1] and n_unique.item() == 4
    assert torch.equal(slot_rows[inverse], rows)
    few = dedup_rows(rows[[0, 1, 4, 6]], n_rows=12)  # fewer lookups than rows
    assert few.slot_rows.tolist() == [0, 3, 7, 9] and torch.equal(few.slot_rows[few.inverse], rows[[0, 1, 4, 6]])
    table_bound = dedup_rows(rows, n_rows=4)  # 4 unique rows fill the 4 slots a 4-row table allows
    assert table_bound.slot_rows.tolist() == [0, 3, 7, 9] and torch.equal(table_bound.slot_rows[table_bound.inverse], rows)
    empty = dedup_rows(torch.zeros(0, dtype=torch.long), n_rows=10)
    assert empty.slot_rows.numel() == 0 and empty.inverse.numel() == 0 and empty.n_unique.item() == 0


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_two_source_bag_kernels_match_reference(source_dtype, device):
    """The bag kernels with an overflow source (slots >= C read the table) against the plain torch
    bag over the buffer followed by the table's overflow rows: output, row and score gradients."""
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(90, 37, generator=gen).to(source_dtype)
    rows = torch.randint(0, 90, (13, 7), generator=gen)
    rows[:, 0] = 4  # a hot row
    dedup = dedup_rows(rows.flatten(), 90)
    n_unique, capacity = int(dedup.n_unique), 20
    assert n_unique > capacity + 16  # several overflow slots, more than one block of them
    weights = torch.randn(13, 7, generator=gen)
    grad_out = torch.randn(13, 37, generator=gen)
    table, rows, weights, grad_out = (t.to(device) for t in (table, rows, weights, grad_out))
    slot_rows, slots = dedup.slot_rows.to(device), dedup.inverse.view(13, 7).to(device)
    buffer = naive.gather_rows(table, slot_rows[:capacity], torch.float32)
    overflow = triton_bag.Overflow(table, table.stride(0), slot_rows, capacity)
    values = naive.slot_values(buffer, table, slot_rows, n_unique)
    assert torch.equal(values, table[slot_rows[:n_unique]].float())
    out = triton_bag._fwd(buffer, slots, weights, overflow)
    torch.testing.assert_close(out, bag_naive.weighted_bag_forward(values, slots, weights), rtol=1e-6, atol=1e-6)
    assert torch.equal(out, triton_bag._fwd(values, slots, weights))  # the overflow source changes no bit
    got = triton_bag._bwd(buffer, slots, weights, grad_out, True, True, overflow)
    expected = bag_naive.weighted_bag_backward(values, slots, weights, grad_out)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[0], torch.arange(n_unique, device=device))
    for ours, reference in zip(got[1:], expected[1:]):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for ours, plain in zip(got, triton_bag._bwd(values, slots, weights, grad_out, True, True)):
        assert torch.equal(ours, plain)


def saved_row_bytes(values: ZeroCopyValues, rows: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the table-wide ([*, V]) tensors a zero-copy bag forward keeps for its backward
    (on a GPU: the device memory the forward holds until backward); then an optimizer step when given."""
    width, kept = values.weight.shape[1], []
    assert rows.shape[1] != width  # the [N, L] lookups are not counted as rows

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 2 and tensor.shape[1] == width:
            kept.append(tensor.numel() * tensor.element_size())
        return tensor

    weights = torch.rand(rows.shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        values.bag(rows, weights, "torch").sum().backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    values.weight.host_rows.grad = None
    return sum(kept)


def lookups_of(n_unique: int, n_tokens: int, n_rows: int, seed: int) -> torch.Tensor:
    """[n_tokens, 6] lookups reading exactly n_unique distinct rows of an n_rows table."""
    gen = torch.Generator().manual_seed(seed)
    distinct = torch.randperm(n_rows, generator=gen)[:n_unique]
    picks = torch.cat([torch.arange(n_unique), torch.randint(0, n_unique, (n_tokens * 6 - n_unique,), generator=gen)])
    return distinct[picks[torch.randperm(picks.numel(), generator=gen)]].view(n_tokens, 6)


def test_zero_copy_buffer_is_independent_of_lookups_and_grows_with_unique_rows_only():
    """The forward's device buffer, once its capacity adapted (one optimizer step), holds about
    margin x the unique rows: independent of N*L once N*L exceeds the table, larger for more unique
    rows, never more than min(N*L, R) (the first step, with no count read yet, takes that bound)."""
    n_rows, width = 1024, 8
    row_bytes = width * 4
    sizes = {}
    for n_unique in (100, 300):
        for n_tokens in (200, 800):  # 1200 and 4800 lookups of a 1024-row table
            values = zero_copy_table(torch.randn(n_rows, width))
            optimizer = AdamW([{"params": [values.weight], "row_update": "lazy"}], weight_decay=0.0, fused=False, **HP)
            first = saved_row_bytes(values, lookups_of(n_unique, n_tokens, n_rows, seed=n_tokens), optimizer)
            assert first == n_rows * row_bytes
            sizes[n_unique, n_tokens] = saved_row_bytes(values, lookups_of(n_unique, n_tokens, n_rows, seed=n_tokens + 1), optimizer)
            assert values.capacity.overflow_calls == 0
    for n_unique in (100, 300):
        assert sizes[n_unique, 200] == sizes[n_unique, 800]
        assert n_unique * row_bytes <= sizes[n_unique, 200] <= 1.25 * n_unique * row_bytes + capacity.ROUND_ROWS * row_bytes
    assert sizes[300, 200] > sizes[100, 200]
    values = zero_copy_table(torch.randn(n_rows, width), first_buffer_rows=64)
    few = lookups_of(20, 5, n_rows, seed=1)  # 30 lookups < 64 rows
    assert saved_row_bytes(values, few) == few.numel() * row_bytes  # the bound min(N*L, R) holds first


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transfer", ["fp32", "bf16"])
def test_overflow_step_is_exact_and_the_capacity_adapts(backend, transfer, caplog, monkeypatch):
    """A step looking up more unique rows than the buffer holds: the rows beyond it are read from
    the host table, so the output and both gradients equal a buffer holding them all (bit for bit)
    and the device table; the overflow is warned about once read and the next buffer holds them."""
    monkeypatch.setattr(capacity, "ROUND_ROWS", 16)  # small buffers: few interpreted programs
    n_rows, width = 64, 20
    gen = torch.Generator().manual_seed(8)
    table = torch.randn(n_rows, width, generator=gen)
    values, unbounded = zero_copy_table(table, transfer=transfer), zero_copy_table(table, transfer=transfer)
    optimizer = AdamW([{"params": [values.weight], "row_update": "lazy", "lr": 0.0}], weight_decay=0.0, fused=False, **HP)
    saved_row_bytes(values, lookups_of(5, 2, n_rows, seed=0), optimizer)  # few unique rows: the buffer shrinks to 16
    rows = torch.randint(0, n_rows, (12, 7), generator=gen)
    rows[:, 0] = 3  # a hot row
    weights = torch.rand(12, 7, generator=gen, requires_grad=True)
    grad_out = torch.randn(12, width, generator=gen)
    outputs = []
    for candidate in (values, unbounded, nn.Parameter(table.clone())):
        weights.grad = None
        if isinstance(candidate, ZeroCopyValues):
            out, param = candidate.bag(rows, weights, backend), candidate.weight
        else:  # the rows a bf16 transfer reads
            param = candidate if transfer == "fp32" else nn.Parameter(candidate.detach().to(torch.bfloat16).float())
            out = weighted_embedding_bag(param, rows, weights, backend)
        out.backward(grad_out)
        outputs.append((out, weights.grad.clone(), grad_of(param).coalesce()))
    n_unique = rows.unique().numel()
    overflowed_at = values.capacity.rows
    assert overflowed_at == 16 < n_unique and unbounded.capacity.rows == n_rows  # this step overflowed
    for got, expected in zip(outputs[0], outputs[1]):  # overflow or not: the same bits
        assert torch.equal(got.indices(), expected.indices()) and torch.equal(got.values(), expected.values()) if got.is_sparse \
            else torch.equal(got, expected)
    out, weights_grad, grad = outputs[0]
    torch.testing.assert_close(out, outputs[2][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights_grad, outputs[2][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(grad.indices(), outputs[2][2].indices())
    torch.testing.assert_close(grad.values(), outputs[2][2].values(), rtol=0, atol=1e-6)
    optimizer.step()
    optimizer.zero_grad()
    with caplog.at_level("WARNING", logger=capacity.__name__):
        values.bag(rows, weights.detach(), backend)  # the next step reads the overflow back
    assert values.capacity.overflow_calls == 1 and values.capacity.overflow_rows == n_unique - overflowed_at
    assert "zero-copy buffer overflow in 1 bag call(s)" in caplog.text
    assert values.capacity.rows >= n_unique


def test_capacity_is_kept_within_a_step():
    """While gradients are recorded the capacity changes only after an optimizer update: an
    activation-checkpoint recompute keeps its forward's buffer size; without gradients it adapts at once."""
    chooser = capacity.BufferCapacity(margin=1.5)
    assert chooser.choose(5000, 1024, updates=0) == 1024
    chooser.record(torch.tensor(100), 1024)
    assert chooser.choose(5000, 1024, updates=0) == 1024  # same step: unchanged
    assert chooser.choose(5000, 1024, updates=1) == 256  # round_up(1.5 * 100, 128)
    chooser.record(torch.tensor(300), 256)
    assert chooser.choose(200, 1024, updates=1) == 200  # never more than the lookups
    with torch.no_grad():
        assert chooser.choose(5000, 1024, updates=1) == 512
    assert chooser.overflow_calls == 1 and chooser.overflow_rows == 44
    with pytest.raises(ValueError, match="margin"):
        capacity.BufferCapacity(margin=0.5)


def pk_args(**overrides) -> ProductKeyArgs:
    return ProductKeyArgs(**{"is_enabled": True, "layers": "0", "mem_n_keys": 8, "mem_heads": 2, "mem_knn": 4, "mem_k_dim": 8, **overrides})


def zero_copy_table(table: torch.Tensor, **kwargs) -> ZeroCopyValues:
    values = ZeroCopyValues(table.shape[0], table.shape[1], lr=None, weight_decay=0.0, update="lazy", lr_schedule=True,
                            dtype=table.dtype, **kwargs)
    values.materialize()
    values.load_state_dict({"weight": table})
    return values


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transfer", ["fp32", "bf16"])
def test_zero_copy_bag_matches_device_table(backend, transfer, device):
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(64, 24, generator=gen)
    rows = torch.randint(0, 64, (9, 10), generator=gen)
    rows[:, 0] = 5  # a hot row
    rows = rows.to(device)
    weights = torch.rand(9, 10, generator=gen).to(device).requires_grad_()
    device_table = nn.Parameter(table.to(device))
    reference = weighted_embedding_bag(device_table, rows, weights, backend)
    grad_out = torch.randn(reference.shape, generator=gen).to(device)
    reference.backward(grad_out)
    reference_weights_grad = weights.grad.clone()
    weights.grad = None
    values = zero_copy_table(table, transfer=transfer)
    out = values.bag(rows, weights, backend)
    out.backward(grad_out)
    tol = dict(rtol=1e-6, atol=1e-6) if transfer == "fp32" else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, **tol)
    torch.testing.assert_close(weights.grad, reference_weights_grad, **tol)
    assert values.weight.grad is None  # the gradient stays on the compute device, in host_rows
    grad, expected_grad = grad_of(values.weight).coalesce(), device_table.grad.coalesce()
    assert grad.dtype == torch.float32  # never rounded to the transfer dtype
    assert torch.equal(grad.indices(), expected_grad.indices())
    torch.testing.assert_close(grad.values(), expected_grad.values(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,buffer_rows", [("torch", None), ("torch", 4), ("triton", 4)])
def test_zero_copy_gradients_float64(backend, buffer_rows, monkeypatch):
    """gradcheck of the score path, and the row gradient left in host_rows against autograd of the
    dense formulation, both in float64; buffer_rows: a buffer smaller than the unique rows (overflow)."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 20, (4, 5), generator=gen)
    weights = torch.rand(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    values = zero_copy_table(table)
    if buffer_rows is not None:
        monkeypatch.setattr(values.capacity, "choose", lambda *args: buffer_rows)
        assert rows.unique().numel() > buffer_rows
    fast = backend == "triton"  # one random direction: few interpreted launches
    assert torch.autograd.gradcheck(lambda w: values.bag(rows, w, backend), (weights,), fast_mode=fast)
    values.weight.host_rows.grad = None
    grad_out = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values.bag(rows, weights, backend).backward(grad_out)
    dense_table = table.clone().requires_grad_()
    bag_naive.weighted_bag_forward(dense_table, rows, weights.detach()).backward(grad_out)
    torch.testing.assert_close(grad_of(values.weight).to_dense(), dense_table.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("row_update", ["lazy", "rowwise_adagrad"])
@pytest.mark.parametrize("update_on", ["device", "host"])
def test_updates_match_device_table_and_leave_other_rows_alone(row_update, update_on):
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(64, 12, generator=gen)
    device_table = nn.Parameter(table.clone())
    values = zero_copy_table(table, update_on=update_on)
    group = dict(row_update=row_update, weight_decay=0.1)
    opt_device = AdamW([{"params": [device_table], **group}], weight_decay=0.1, fused=False, **HP)
    opt_host = AdamW([{"params": [values.weight], **group}], weight_decay=0.1, fused=False, **HP)
    for step in range(3):
        rows = torch.randint(0, 32, (6, 5), generator=gen)  # rows 32.. are never read
        weights = torch.rand(6, 5, generator=gen)
        grad_out = torch.randn(6, 12, generator=gen)
        before = values.weight.detach().clone()
        state_before = {k: v.clone() for k, v in opt_host.state[values.weight].items()}
        weighted_embedding_bag(device_table, rows, weights).backward(grad_out)
        values.bag(rows, weights, "auto").backward(grad_out)
        norms = clip_grad_norm([device_table], 0.5), clip_grad_norm([values.weight], 0.5)
        assert torch.equal(norms[0], norms[1])
        opt_device.step()
        opt_host.step()
        opt_device.zero_grad()
        opt_host.zero_grad()
        assert grad_of(values.weight) is None
        assert torch.equal(values.weight, device_table)  # same math, same order: bit-identical
        for key, tensor in opt_device.state[device_table].items():
            assert torch.equal(opt_host.state[values.weight][key], tensor), key
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[rows.unique()] = False
        assert torch.equal(values.weight[untouched], before[untouched])
        for key, tensor in opt_host.state[values.weight].items():
            if tensor.dim() > 0:
                assert torch.equal(tensor[untouched], state_before[key][untouched]), key
        assert not torch.equal(values.weight[~untouched], before[~untouched])


def test_dense_update_and_peer_and_offload_are_refused():
    with pytest.raises(ConfigError, match="value_update=lazy or rowwise_adagrad"):
        pk_args(zero_copy=True, value_update="dense")
    with pytest.raises(ConfigError, match="peer_variant"):
        pk_args(zero_copy=True, peer_variant=True)
    with pytest.raises(ConfigError, match="mem_offload=true .* not supported.*zero_copy=true"):
        pk_args(mem_offload=True)
    table = zero_copy_table(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="lazy or rowwise_adagrad"):
        AdamW([{"params": [table.weight], "row_update": "dense"}], weight_decay=0.0, fused=False, **HP)


def test_too_little_host_memory_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "available_host_bytes", lambda shared: 2**30)
    cfg = config_from_dict(MainTrainArgs, {
        "dump_dir": str(tmp_path / "run"),
        "model": {"dim": 1024, "n_layers": 2, "n_heads": 8, "max_seqlen": 256,
                  "productkey_args": {"is_enabled": True, "layers": "1", "mem_n_keys": 1024, "zero_copy": True}},
    })
    with pytest.raises(ConfigError, match=r"zero_copy=true .* needs 12\.0 GiB of host memory"):
        check_host_memory(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="zero-copy value table 1048576 x 1024"):
        ZeroCopyValues(1024**2, 1024, None, 0.0, "lazy", True).materialize()


def lm(zero_copy: bool, **pk) -> LMTransformer:
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seqlen=16, multiple_of=16,
                             productkey_args=pk_args(layers="0,1", zero_copy=zero_copy, value_fixed_lr=0.05, **pk))
    with torch.device("meta"):
        model = LMTransformer(args)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def test_device_moves_leave_the_table_in_host_memory():
    model = lm(True)
    table = model.memory_values.weight
    pointer = table.data_ptr()
    assert all(block.feed_forward.table is model.memory_values for block in model.layers)
    assert model.layers[0].feed_forward.usage_hits.numel() == 0  # no per-row state on the device
    model.to(torch.bfloat16)
    model.to("meta")
    assert model.memory_values.weight is table and table.device.type == "cpu" and table.dtype == torch.float32
    assert table.data_ptr() == pointer and not table.is_meta
    assert "memory_values.weight" in model.state_dict()


def train_steps(model: LMTransformer, steps: range) -> tuple[list[float], torch.optim.Optimizer]:
    optimizer, _ = build_optimizer(model, OptimArgs(lr=1e-2, warmup=0), 100, memory_param_groups(model))
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 50, (2, 16), generator=gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def test_model_trains_like_the_device_table():
    """An LM with zero-copy values and one with device values, same init: the same losses and tables."""
    device, zero_copy = lm(False), lm(True)
    assert torch.equal(device.memory_values.weight, zero_copy.memory_values.weight) is False  # seeded differently
    zero_copy.load_state_dict(device.state_dict())
    losses_device, _ = train_steps(device, range(4))
    losses_zero_copy, _ = train_steps(zero_copy, range(4))
    assert losses_zero_copy == pytest.approx(losses_device, rel=1e-5)
    torch.testing.assert_close(zero_copy.memory_values.weight, device.memory_values.weight, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path: Path):
    model = lm(True)
    _, optimizer = train_steps(model, range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=str(tmp_path), no_dist=True)
        resumed = lm(True)
        resumed_opt, _ = build_optimizer(resumed, OptimArgs(lr=1e-2, warmup=0), 100, memory_param_groups(resumed))
        model_state, optim_state = get_state_dict(resumed, resumed_opt)
        table_state = optim_state["state"]["memory_values.weight"]
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path), no_dist=True)
        set_state_dict(resumed, resumed_opt, model_state_dict=model_state, optim_state_dict=optim_state)
    table, resumed_table = model.memory_values.weight, resumed.memory_values.weight
    assert torch.equal(table, resumed_table)
    state, resumed_state = optimizer.state[table], resumed_opt.state[resumed_table]
    assert set(state) == set(resumed_state) == {"step", "exp_avg", "exp_avg_sq", "row_step"}
    for key in state:
        assert torch.equal(state[key], resumed_state[key]), key
    # The optimizer keeps the host tensors it was given (loaded in place, not copies).
    assert resumed_state["exp_avg"].data_ptr() == table_state["exp_avg"].data_ptr()
    assert train_steps(model, range(3, 5))[0] == train_steps(resumed, range(3, 5))[0]


def test_bf16_copy_follows_updates_and_loads():
    model = lm(True, zero_copy_transfer="bf16")
    table = model.memory_values
    assert torch.equal(table.host.low_precision, table.weight.detach().to(torch.bfloat16))
    train_steps(model, range(2))
    assert torch.equal(table.host.low_precision, table.weight.detach().to(torch.bfloat16))
    other = lm(True, zero_copy_transfer="bf16")
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.memory_values.host.low_precision, table.host.low_precision)


def test_parallel_fill_depends_on_the_seed_only():
    a = host.fill_normal_(torch.empty(3 * host.FILL_CHUNK // 2), 0.5, seed=11, threads=1)
    b = host.fill_normal_(torch.empty(3 * host.FILL_CHUNK // 2), 0.5, seed=11, threads=2)
    assert torch.equal(a, b)
    assert abs(a.std().item() - 0.5) < 0.01


def test_host_tensors_own_their_pages():
    """Page-locking works on whole pages: each host tensor starts on a page and shares none."""
    page = os.sysconf("SC_PAGE_SIZE")
    memory = host.HostMemory()
    tensors = [memory.zeros(shape, dtype) for shape, dtype in [((7, 3), torch.float32), ((5,), torch.float32), ((2, 9), torch.bfloat16), ((0,), torch.float32)]]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(start % page == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert all(t.eq(0).all() and t.is_contiguous() for t in tensors) and tensors[2].dtype == torch.bfloat16


def test_trained_model_loads_for_eval_with_the_table_in_host_memory(tmp_path: Path):
    write_corpus(tmp_path / "data", "stories", n_train=40, n_val=4, n_chunks=1, seed=0)
    cfg = config_from_dict(MainTrainArgs, {
        "dump_dir": str(tmp_path / "run"), "steps": 4,
        "data": {"root_dir": str(tmp_path / "data"), "batch_size": 2, "seq_len": 16, "load_async": False, "tokenizer": {"name": "bytes"}},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seqlen": 16, "multiple_of": 16,
                  "productkey_args": {**pk_args(layers="0,1", zero_copy=True, zero_copy_transfer="bf16").__dict__}},
        "checkpoint": {"dump": {"every": 4, "keep": 1}},
    })
    train(cfg, MODEL_SPEC)
    folder = step_dirs(tmp_path / "run" / "checkpoints")[-1]
    tokens = torch.randint(0, 258, (2, 16))
    logits = []
    for ckpt in (folder, consolidate(folder)):
        model, _, _ = load_model_and_tokenizer(str(ckpt), device="auto")
        table = model.memory_values
        assert isinstance(table, ZeroCopyValues) and table.weight.device.type == "cpu" and table.host is not None
        assert torch.equal(table.host.low_precision, table.weight.detach().to(torch.bfloat16))
        with torch.no_grad():
            logits.append(model(tokens))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (UVA reads of host memory)")
@pytest.mark.parametrize("row_update", ["lazy", "rowwise_adagrad"])
def test_gpu_reads_and_updates_the_host_table_over_uva(row_update):
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(4096, 96, generator=gen)
    rows = torch.randint(0, 4096, (64, 16), generator=gen).cuda()
    weights = torch.rand(64, 16, generator=gen).cuda()
    grad_out = torch.randn(64, 96, generator=gen).cuda()
    device_table = nn.Parameter(table.cuda())
    values = zero_copy_table(table)
    assert values.weight.device.type == "cpu" and values.weight.is_pinned()
    reference = weighted_embedding_bag(device_table, rows, weights)
    out = values.bag(rows, weights, "auto")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    reference.backward(grad_out)
    out.backward(grad_out)
    assert grad_of(values.weight).is_cuda
    opt_device = AdamW([{"params": [device_table], "row_update": row_update}], weight_decay=0.1, fused=False, **HP)
    opt_host = AdamW([{"params": [values.weight], "row_update": row_update}], weight_decay=0.1, fused=False, **HP)
    opt_device.step()
    opt_host.step()  # the fused row-update kernel, over UVA
    torch.cuda.synchronize()
    torch.testing.assert_close(values.weight.detach(), device_table.detach().cpu(), rtol=1e-6, atol=1e-6)
    for key, state in opt_device.state[device_table].items():
        torch.testing.assert_close(opt_host.state[values.weight][key], state.cpu(), rtol=1e-6, atol=1e-7, msg=key)
        assert key == "step" or opt_host.state[values.weight][key].device.type == "cpu"
    assert values.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host syncs exist only there)")
def test_gpu_forward_and_its_capacity_choice_never_sync():
    """A zero-copy bag forward on CUDA, adapted capacity and overflow included, makes no host sync."""
    gen = torch.Generator().manual_seed(9)
    values = zero_copy_table(torch.randn(4096, 64, generator=gen))
    optimizer = AdamW([{"params": [values.weight], "row_update": "lazy"}], weight_decay=0.0, fused=False, **HP)
    for n_unique in (100, 1000):  # the second step overflows its 128-row buffer
        rows = lookups_of(n_unique, 400, 4096, seed=n_unique).cuda()
        weights = torch.rand(rows.shape, generator=gen).cuda().requires_grad_()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = values.bag(rows, weights, "auto")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()  # the count copies have landed: the next step's capacity is known
    assert values.capacity.rows == 128
    values.bag(rows, weights.detach(), "auto")
    assert values.capacity.overflow_calls == 1 and values.capacity.rows >= 1000
