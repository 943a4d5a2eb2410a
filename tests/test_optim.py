"""Tests of lingua/optim.py: schedule values against closed forms, parameter groups (decay
exclusion, fixed-lr groups), scheduler state round trip and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lingua.args import ConfigError, config_from_dict
from lingua.optim import OptimArgs, ParamGroupSpec, build_optimizer, clip_grad_norm, clip_gradients, lr_multiplier
from lingua.transformer import RMSNorm


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = RMSNorm(4)
        self.values = nn.Linear(4, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.norm(self.proj(self.embed(x))))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


# ---------------------------------------------------------------------------------------------
# Schedules: warmup 10, 110 steps, floor 0.1 -> 100 post-warmup steps.

N_STEPS = 110
WARMUP_AND_DECAY = [
    # (scheduler, extra args, step, expected multiplier)
    ("constant", {}, 0, 1 / 11),
    ("constant", {}, 9, 10 / 11),
    ("constant", {}, 10, 1.0),
    ("constant", {}, 500, 1.0),
    ("linear", {}, 60, 0.55),
    ("linear", {}, 35, 0.1 + 0.9 * 0.75),
    ("linear", {}, 110, 0.1),
    ("linear", {}, 400, 0.1),
    ("cosine", {}, 10, 1.0),
    ("cosine", {}, 35, 0.1 + 0.45 * (1 + math.sqrt(0.5))),
    ("cosine", {}, 60, 0.55),
    ("cosine", {}, 110, 0.1),
    ("cosine", {}, 300, 0.1),
    ("cosine", {"cosine_theta": 2.0}, 60, 0.1 + 0.45 * (1 + math.sqrt(0.5))),
    ("cosine", {"cycle_length": 0.5}, 35, 0.55),  # half way down the first of two cycles
    ("cosine", {"cycle_length": 0.5}, 60, 0.1),
    ("cosine", {"cycle_length": 0.5}, 70, 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi))),  # restarted: 1/5 into cycle 2
    ("cosine", {"cycle_length": 0.5}, 110, 0.1),  # the last step ends cycle 2, no jump back up
    ("cosine", {"cycle_length": 0.25, "cosine_theta": 2.0}, 45, 0.1 + 0.45 * (1 + math.cos(0.16 * math.pi))),  # 0.4 into cycle 2
    ("constant", {"warmup_from_zero": True}, 0, 0.0),  # the public code: step / warmup
    ("constant", {"warmup_from_zero": True}, 4, 0.4),
    ("constant", {"warmup_from_zero": True}, 10, 1.0),
    ("linear", {"warmup_from_zero": True}, 60, 0.55),
    ("cosine", {"lr_min_ratio": 0.0}, 110, 0.0),
    ("wsd", {}, 5, 6 / 11),
    ("wsd", {}, 50, 1.0),
    ("wsd", {}, 99, 1.0),  # the decay takes the last 11 steps: 99..110
    ("wsd", {}, 102, 0.1 + 0.9 * (1 - math.sqrt(3 / 11))),
    ("wsd", {}, 110, 0.1),
    ("wsd", {"decay_fraction": 0.5}, 82, 0.1 + 0.9 * (1 - math.sqrt(27 / 55))),
    ("inv_sqrt", {}, 43, 0.5),  # (11 / 44) ** 0.5
    ("inv_sqrt", {"exp_factor": 1.0}, 21, 0.5),
    ("inv_sqrt", {}, 5000, 0.1),  # floored
]


@pytest.mark.parametrize("scheduler,extra,step,expected", WARMUP_AND_DECAY)
def test_schedule_closed_form(scheduler: str, extra: dict, step: int, expected: float) -> None:
    args = OptimArgs(**({"scheduler": scheduler, "warmup": 10, "lr_min_ratio": 0.1} | extra))
    assert lr_multiplier(step, args, N_STEPS) == pytest.approx(expected, abs=1e-9)


def test_scheduler_drives_group_lrs() -> None:
    model = Small()
    args = OptimArgs(lr=2e-3, scheduler="cosine", warmup=10, lr_min_ratio=0.1)
    optimizer, scheduler = build_optimizer(model, args, N_STEPS)
    seen = {}
    for step in range(111):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(2e-3 / 11)
    assert seen[10] == pytest.approx(2e-3)
    assert seen[60] == pytest.approx(2e-3 * 0.55)
    assert seen[110] == pytest.approx(2e-4)


def test_args_validation() -> None:
    with pytest.raises(ConfigError, match=r"lr_min_ratio=1.5 must be in \[0, 1\]"):
        config_from_dict(OptimArgs, {"lr_min_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"beta2=1.0 must be in \[0, 1\)"):
        config_from_dict(OptimArgs, {"beta2": 1.0})
    with pytest.raises(ConfigError, match=r"decay_fraction=0.0 must be in \(0, 1\]"):
        config_from_dict(OptimArgs, {"decay_fraction": 0.0})


# ---------------------------------------------------------------------------------------------
# Parameter groups


def test_norms_biases_and_embeddings_excluded_from_decay() -> None:
    model = Small()
    optimizer, _ = build_optimizer(model, OptimArgs(weight_decay=0.5), 10)
    groups = {g["name"]: g for g in optimizer.param_groups}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([model.proj.weight, model.values.weight])
    assert ids(groups["no_decay"]["params"]) == ids([model.proj.bias, model.norm.weight, model.embed.weight])
    assert groups["decay"]["weight_decay"] == 0.5 and groups["no_decay"]["weight_decay"] == 0.0

    optimizer, _ = build_optimizer(model, OptimArgs(decay_embeddings=True), 10)
    assert id(model.embed.weight) in ids(optimizer.param_groups[0]["params"])


def test_decay_is_applied_only_to_decay_group() -> None:
    """With zero gradients Adam's update is zero, so only decoupled decay moves parameters."""
    model = Small()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = OptimArgs(lr=0.1, weight_decay=0.5, scheduler="constant", warmup=0)
    optimizer, _ = build_optimizer(model, args, 10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if name in ("proj.weight", "values.weight") else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_fixed_lr_group_keeps_its_lr() -> None:
    model = Small()
    specs = [
        ParamGroupSpec("memory_values", [model.values.weight], lr=1e-3, weight_decay=0.0),
        ParamGroupSpec("scheduled_fixed", [model.proj.weight], lr=5e-3, follow_schedule=True),
    ]
    args = OptimArgs(lr=1e-4, scheduler="linear", warmup=4, lr_min_ratio=0.0)
    optimizer, scheduler = build_optimizer(model, args, 20, specs)
    # Both matrices are claimed, so the empty "decay" group is dropped.
    assert [g["name"] for g in optimizer.param_groups] == ["no_decay", "memory_values", "scheduled_fixed"]
    for step in range(25):
        lrs = group_lrs(optimizer)
        multiplier = lr_multiplier(step, args, 20)
        assert lrs["memory_values"] == 1e-3
        assert lrs["scheduled_fixed"] == pytest.approx(5e-3 * multiplier)
        assert lrs["no_decay"] == pytest.approx(1e-4 * multiplier)
        optimizer.step()
        scheduler.step()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["memory_values"]["weight_decay"] == 0.0
    assert groups["scheduled_fixed"]["weight_decay"] == 0.1


def test_param_group_errors() -> None:
    model = Small()
    with pytest.raises(ValueError, match="'a' and 'b'"):
        specs = [ParamGroupSpec("a", [model.values.weight]), ParamGroupSpec("b", [model.values.weight])]
        build_optimizer(model, OptimArgs(), 10, specs)
    with pytest.raises(ValueError, match="not in the model"):
        build_optimizer(model, OptimArgs(), 10, [ParamGroupSpec("a", [nn.Parameter(torch.zeros(2))])])
    with pytest.raises(ValueError, match="used twice"):
        build_optimizer(model, OptimArgs(), 10, [ParamGroupSpec("decay", [model.values.weight])])


def test_optimizer_and_scheduler_state_round_trip() -> None:
    torch.manual_seed(0)
    args = OptimArgs(lr=1e-2, scheduler="wsd", warmup=3, decay_fraction=0.3)
    x = torch.randint(0, 10, (8,))

    def train(model: Small, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> None:
        for _ in range(steps):
            model(x).square().mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    model = Small()
    specs = lambda m: [ParamGroupSpec("memory_values", [m.values.weight], lr=3e-3)]  # noqa: E731
    optimizer, scheduler = build_optimizer(model, args, 20, specs(model))
    train(model, optimizer, scheduler, 7)
    saved = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict())
    saved = tuple(_deep_clone(s) for s in saved)

    resumed = Small()
    resumed.load_state_dict(saved[0])
    optimizer2, scheduler2 = build_optimizer(resumed, args, 20, specs(resumed))
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    assert scheduler2.last_epoch == 7
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    train(model, optimizer, scheduler, 10)
    train(resumed, optimizer2, scheduler2, 10)
    assert group_lrs(optimizer2) == group_lrs(optimizer)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _deep_clone(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _deep_clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_clone(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Clipping


def _two_models_with_grads(seed: int, scale: float) -> tuple[Small, Small]:
    torch.manual_seed(seed)
    a = Small()
    b = Small()
    b.load_state_dict(a.state_dict())
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    a.norm.weight.grad = None
    b.norm.weight.grad = None
    return a, b


@pytest.mark.parametrize("max_norm,norm_type", [(1.0, 2.0), (1e6, 2.0), (0.5, float("inf"))])
def test_clip_matches_torch(max_norm: float, norm_type: float) -> None:
    ours, ref = _two_models_with_grads(0, scale=3.0)
    norm = clip_grad_norm(ours.parameters(), max_norm, norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    assert isinstance(norm, torch.Tensor)
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(ours.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("value_scale", [0.1, 10.0])
def test_value_groups_clipped_separately(value_scale: float) -> None:
    """clip_value_groups_separately: the row-sparse group and the rest are each clipped to `clip`,
    as two torch clip_grad_norm_ calls would (the public Memory Layers code); the returned norm is
    the global one before clipping. One global clip scales both parts by the same factor."""
    model = Small()
    torch.manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * (value_scale if param is model.values.weight else 3.0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    global_norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    expected = {name: grad.clone() for name, grad in grads.items()}
    for part in ([expected["values.weight"]], [g for n, g in expected.items() if n != "values.weight"]):
        torch.nn.utils.clip_grad_norm_(_holding(part), 1.0)
    separately = OptimArgs(clip=1.0, clip_value_groups_separately=True)
    specs = [ParamGroupSpec("memory_values", [model.values.weight], row_update="lazy")]
    optimizer, _ = build_optimizer(model, separately, 10, specs)
    torch.testing.assert_close(clip_gradients(model.parameters(), optimizer, separately), global_norm)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)
    assert model.values.weight.grad.norm().item() == pytest.approx(min(grads["values.weight"].norm().item(), 1.0), rel=1e-5)

    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    torch.testing.assert_close(clip_gradients(model.parameters(), optimizer, OptimArgs(clip=1.0)), global_norm)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name] / (global_norm + 1e-6), msg=name)


def _holding(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    """Parameters whose gradients are `grads` themselves, so clipping them clips `grads` in place."""
    params = []
    for grad in grads:
        param = nn.Parameter(torch.zeros_like(grad))
        param.grad = grad
        params.append(param)
    return params


def test_clip_zero_measures_only() -> None:
    ours, ref = _two_models_with_grads(1, scale=3.0)
    norm = clip_grad_norm(ours.parameters(), 0.0)
    expected = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None]).norm()
    torch.testing.assert_close(norm, expected)
    for p, q in zip(ours.parameters(), ref.parameters()):
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad)


def test_clip_sharded_grads_on_two_meshes(tmp_path: object) -> None:
    """DTensor grads on two meshes plus plain grads combine into one global norm (world size 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh_a = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        mesh_b = init_device_mesh("cpu", (1, 1), mesh_dim_names=("memory", "other"))
        torch.manual_seed(0)
        plain = [torch.randn(5, 3) for _ in range(3)]
        params = [nn.Parameter(torch.zeros(5, 3))]
        params[0].grad = plain[0].clone()
        for grad, mesh, placements in ((plain[1], mesh_a, [Shard(0)]), (plain[2], mesh_b, [Shard(0), Shard(1)])):
            sharded = nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, placements))
            sharded.grad = distribute_tensor(grad.clone(), mesh, placements)
            params.append(sharded)
        norm = clip_grad_norm(params, 1.0)
        expected = torch.cat([g.flatten() for g in plain]).norm()
        torch.testing.assert_close(norm, expected)
        scale = 1.0 / (expected + 1e-6)
        for param, grad in zip(params, plain):
            full = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            torch.testing.assert_close(full, grad * scale)
    finally:
        dist.destroy_process_group()


def test_annealing_step_leaves_the_schedule_alone() -> None:
    """optim.annealing_step is accepted for compatibility only: every schedule ignores it."""
    for scheduler in ("constant", "linear", "inv_sqrt", "cosine", "wsd"):
        plain = OptimArgs(scheduler=scheduler, warmup=5)
        annealed = OptimArgs(scheduler=scheduler, warmup=5, annealing_step=7)
        assert [lr_multiplier(s, annealed, 50) for s in range(60)] == [lr_multiplier(s, plain, 50) for s in range(60)]
