"""The optimizer of row-sparse value tables: lazy and dense row updates against dense references,
clipping with sparse gradients, and an exact DCP save/load round trip of model + optimizer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lingua.optim import AdamW, OptimArgs, ParamGroupSpec, RowStep, build_optimizer, clip_grad_norm
from lingua.product_key.embedding_bag import weighted_embedding_bag

ROWS, DIM = 12, 5
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def sparse_grad(rows: list[int], seed: int, dim: int = DIM) -> torch.Tensor:
    """An uncoalesced sparse gradient (rows may repeat, as when several layers read one table)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.tensor([rows])
    return torch.sparse_coo_tensor(index, torch.randn(len(rows), dim, generator=gen), (ROWS, dim), check_invariants=True)


STEPS_ROWS = [[1, 3, 3, 7], [0, 1], [3, 11, 5, 5, 5], [1], [2, 3, 4, 7, 1]]


def make_table(seed: int = 0) -> nn.Parameter:
    return nn.Parameter(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_matches_per_row_adamw(weight_decay):
    """lazy: each row evolves as if it had its own AdamW stepped only when the row is read."""
    table = make_table()
    opt = AdamW([{"params": [table], "row_update": "lazy"}], weight_decay=weight_decay, fused=False, **HP)
    ref_rows = [nn.Parameter(table.detach()[r].clone()) for r in range(ROWS)]
    ref_opts = [torch.optim.AdamW([p], weight_decay=weight_decay, foreach=False, **HP) for p in ref_rows]
    for step, rows in enumerate(STEPS_ROWS):
        grad = sparse_grad(rows, step)
        table.grad = grad
        opt.step()
        dense = grad.to_dense()
        for r in set(rows):
            ref_rows[r].grad = dense[r].clone()
            ref_opts[r].step()
        torch.testing.assert_close(table.detach(), torch.stack([p.detach() for p in ref_rows]), rtol=1e-6, atol=1e-7)
    untouched = sorted(set(range(ROWS)) - {r for rows in STEPS_ROWS for r in rows})
    assert untouched and torch.equal(opt.state[table]["row_step"][untouched], torch.zeros(len(untouched)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_rows_match_torch_adamw(weight_decay):
    """dense: exact AdamW on the implied dense gradient (absent rows keep moving on momentum)."""
    table, ref = make_table(), make_table()
    opt = AdamW([{"params": [table], "row_update": "dense"}], weight_decay=weight_decay, fused=False, **HP)
    ref_opt = torch.optim.AdamW([ref], weight_decay=weight_decay, foreach=False, **HP)
    for step, rows in enumerate(STEPS_ROWS):
        grad = sparse_grad(rows, step)
        table.grad = grad
        ref.grad = grad.to_dense()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(table.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_lazy_with_every_row_equals_adamw_and_dense_grads_accepted():
    table, ref = make_table(), make_table()
    opt = AdamW([{"params": [table], "row_update": "lazy"}], weight_decay=0.1, fused=False, **HP)
    ref_opt = torch.optim.AdamW([ref], weight_decay=0.1, foreach=False, **HP)
    for step in range(4):
        grad = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(step))
        table.grad = grad.to_sparse(1) if step % 2 else grad.clone()  # a dense grad reads every row
        ref.grad = grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(table.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_dense_groups_match_torch_adamw():
    model, ref = nn.Linear(6, 4), nn.Linear(6, 4)
    ref.load_state_dict(model.state_dict())
    opt = AdamW([{"params": list(model.parameters())}], weight_decay=0.1, fused=False, **HP)
    ref_opt = torch.optim.AdamW(ref.parameters(), weight_decay=0.1, foreach=True, **HP)
    x = torch.randn(3, 6)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sparse_grad_in_dense_group_is_refused():
    table = make_table()
    opt = AdamW([{"params": [table], "name": "oops"}], weight_decay=0.0, fused=False, **HP)
    table.grad = sparse_grad([1], 0)
    with pytest.raises(ValueError, match="'oops' got a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_with_sparse_grads_matches_dense(max_norm):
    dense_param, table = nn.Parameter(torch.randn(3, 4)), make_table()
    dense_param.grad = torch.randn(3, 4)
    table.grad = sparse_grad([2, 2, 5, 9], 1)  # duplicate rows: their sum counts, not each part
    ref_dense, ref_table = dense_param.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    ref_dense.grad, ref_table.grad = dense_param.grad.clone(), table.grad.to_dense()
    norm = clip_grad_norm([dense_param, table], max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_([ref_dense, ref_table], max_norm)
    torch.testing.assert_close(norm, ref_norm)
    assert table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), ref_table.grad)
    torch.testing.assert_close(dense_param.grad, ref_dense.grad)


class TinyMemoryModel(nn.Module):
    """A dense layer plus a value table read through the row-sparse bag."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.table = nn.Parameter(torch.randn(ROWS, DIM))

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.proj(weighted_embedding_bag(self.table, indices, weights)).square().mean()


def _train(model: TinyMemoryModel, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        indices = torch.randint(0, ROWS // 2, (4, 3), generator=gen)  # half the rows are never read
        model(indices, torch.rand(4, 3, generator=gen)).backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("row_update", ["lazy", "dense"])
def test_dcp_round_trip_with_sparse_group_is_exact(tmp_path, row_update):
    def build() -> tuple[TinyMemoryModel, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = TinyMemoryModel()
        specs = [ParamGroupSpec("memory_values", [model.table], lr=1e-2, weight_decay=0.0, row_update=row_update)]
        return model, build_optimizer(model, OptimArgs(lr=1e-3, warmup=0), 100, specs)[0]

    model, opt = build()
    _train(model, opt, range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))), checkpoint_id=str(tmp_path), no_dist=True)
        resumed, resumed_opt = build()
        model_state, optim_state = get_state_dict(resumed, resumed_opt)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path), no_dist=True)
        set_state_dict(resumed, resumed_opt, model_state_dict=model_state, optim_state_dict=optim_state)
    _train(model, opt, range(3, 7))
    _train(resumed, resumed_opt, range(3, 7))
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state, resumed_state = opt.state[model.table], resumed_opt.state[resumed.table]
    assert set(state) == set(resumed_state)
    for key in state:
        torch.testing.assert_close(state[key], resumed_state[key], rtol=0, atol=0)


def test_a_row_step_sets_the_fields_of_exactly_one_rule():
    rows, grads, per_row = torch.arange(3), torch.zeros(3, DIM), torch.ones(3)
    hyper = dict(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    assert RowStep(rows, grads, **hyper, bias_correction1=per_row, bias_correction2_sqrt=per_row).is_adam
    assert not RowStep(rows, grads, **hyper, adagrad_denominator=per_row).is_adam
    for fields in ({}, {"bias_correction1": per_row}, {"bias_correction1": per_row, "bias_correction2_sqrt": per_row, "adagrad_denominator": per_row}):
        with pytest.raises(ValueError, match="lazy Adam.*rowwise Adagrad"):
            RowStep(rows, grads, **hyper, **fields)
