"""Zero-copy product-key values (table in host memory, read by the GPU over UVA) vs references.

    python -m benchmarks.zero_copy              # GPU: 1M x 1024 fp32 table, 8192 tokens x 128 lookups
    python -m benchmarks.zero_copy --tiny       # CPU, small shape, seconds (a smoke test of this script)
    python -m benchmarks.zero_copy --big        # also train a 16M-row table (larger than the GPU) zero-copy

Candidates, timed in the same run after a parity gate (outputs, value gradients, updated rows):
- zero-copy (update on device / on host), zero-copy bf16 transfer: `ZeroCopyValues` with lazy
  AdamW on the touched rows (lingua.optim.AdamW, row_update="lazy");
- GPU-resident: the same table as a device Parameter, `weighted_embedding_bag`, the same AdamW;
- public approach (reference): the public agi_test ZeroCopy module, rewritten here
  from its description: torch.unique on the GPU, ids to the CPU, autograd index of a
  CPU fp32 Parameter (dense CPU gradient), rows to bf16 then to the GPU, emb[inverse] * scores
  summed; torch's AdamW over the whole CPU table.
Each is timed as forward, forward + backward, and forward + backward + update (clip at 1.0,
optimizer step, zero_grad). Bytes over PCIe are an estimate from the unique rows, per direction
(see `pcie_bytes`); GB/s are compared with a pinned host->device copy measured in the same run,
and the floor time is the busier direction's bytes at that peak (PCIe carries both directions
at once, and the fused row update reads and writes together).
Shapes: N tokens, L lookups per token, R table rows, V row width, U unique rows.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch import Tensor, nn

from benchmarks.timing import Timing, format_table, full_size_needs_gpu, time_fn
from lingua.optim import AdamW, clip_grad_norm
from lingua.product_key.embedding_bag import weighted_embedding_bag
from lingua.product_key.zero_copy import ZeroCopyValues, available_host_bytes, capacity, fill_normal_

LR = 1e-3  # ProductKeyArgs.value_fixed_lr
WEIGHT_DECAY = 0.0  # ProductKeyArgs.value_weight_decay
BETAS = (0.9, 0.95)
EPS = 1e-8
CLIP = 1.0
GOAL_FORWARD_MS = 35.0  # H100 goal
GOAL_STEP_MS = 60.0
GB = 1e9
GIB = 2**30
Bytes = tuple[int, int]  # bytes over PCIe: (to the device, to the host)


def _sync() -> None:
    """Wait for the GPU (before host code reads host rows the GPU wrote, and before measuring)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    """Free what dropped candidates held: host tables (their HostMemory unpins them when collected;
    Parameter.host_rows -> HostRows -> Parameter is a cycle, hence gc) and cached GPU blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks torch's host allocator keeps
        if host_empty_cache is not None:
            host_empty_cache()


class ZeroCopy:
    """`ZeroCopyValues` + lingua AdamW over its touched rows (lazy, or rowwise Adagrad)."""

    def __init__(
        self, n_rows: int, dim: int, transfer: str, update_on: str, init: Tensor | None = None,
        weight_decay: float = WEIGHT_DECAY, row_update: str = "lazy",
    ) -> None:
        self.transfer, self.update_on, self.row_update = transfer, update_on, row_update
        self.values = ZeroCopyValues(n_rows, dim, LR, weight_decay, row_update, False, transfer, update_on)
        self.values.materialize()
        if init is None:
            self.values.init_weights()
        else:
            self.values.weight.data.copy_(init)
            self.values.refresh_low_precision()
        groups = [{"params": [self.values.weight], "row_update": row_update}]
        self.opt = AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=False)

    def forward(self, rows_NL: Tensor, weights_NL: Tensor) -> Tensor:
        return self.values.bag(rows_NL, weights_NL, "auto")

    def update(self) -> None:
        clip_grad_norm([self.values.weight], CLIP)
        self.opt.step()
        self.opt.zero_grad()

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def value_grad(self) -> Tensor:
        grad = self.values.weight.host_rows.grad
        return grad.to_dense().cpu()

    def table(self) -> Tensor:
        _sync()  # device updates write host rows asynchronously
        return self.values.weight.detach().clone()

    @staticmethod
    def host_bytes(n_rows: int, dim: int, transfer: str, row_update: str = "lazy") -> int:
        """Host memory of the table and its optimizer state."""
        table = n_rows * dim * (4 + (2 if transfer == "bf16" else 0))
        state = n_rows * 4 + (2 * n_rows * dim * 4 if row_update == "lazy" else 0)
        return table + state

    def pcie_bytes(self, n_unique: int, dim: int) -> tuple[Bytes, Bytes, Bytes]:
        """(forward, backward, update) bytes crossing PCIe, each (to device, to host): the gather
        reads U rows in the transfer dtype; a device update reads and writes each row's weight, Adam
        moments and step count (and writes the bf16 copy's row); a host update moves the gradient
        rows and their ids to the CPU."""
        forward = (n_unique * dim * (2 if self.transfer == "bf16" else 4), 0)
        if self.update_on == "host":
            update = (0, n_unique * (dim * 4 + 8))
        else:
            per_row = dim * 4 * (3 if self.row_update == "lazy" else 1) + 4
            update = (n_unique * per_row, n_unique * (per_row + (dim * 2 if self.transfer == "bf16" else 0)))
        return forward, (0, 0), update


class GpuResident:
    """The table as a device Parameter: `weighted_embedding_bag` (row-sparse gradient) + lazy AdamW."""

    def __init__(self, n_rows: int, dim: int, device: torch.device, init: Tensor | None = None, weight_decay: float = WEIGHT_DECAY) -> None:
        table = torch.empty(n_rows, dim, device=device)
        if init is None:
            table.normal_(0.0, dim**-0.5)
        else:
            table.copy_(init)
        self.weight = nn.Parameter(table)
        groups = [{"params": [self.weight], "row_update": "lazy"}]
        self.opt = AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=False)

    def forward(self, rows_NL: Tensor, weights_NL: Tensor) -> Tensor:
        return weighted_embedding_bag(self.weight, rows_NL, weights_NL)

    def update(self) -> None:
        clip_grad_norm([self.weight], CLIP)
        self.opt.step()
        self.opt.zero_grad()

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def value_grad(self) -> Tensor:
        return self.weight.grad.to_dense().cpu()

    def table(self) -> Tensor:
        return self.weight.detach().cpu()

    @staticmethod
    def device_bytes(n_rows: int, dim: int) -> int:
        """Device memory of the table and its lazy Adam state (moments and per-row step counts)."""
        return n_rows * dim * 4 * 3 + n_rows * 4

    def pcie_bytes(self, n_unique: int, dim: int) -> tuple[Bytes, Bytes, Bytes]:
        return (0, 0), (0, 0), (0, 0)


class PublicApproach:
    """The public ZeroCopy module's formulation (reference digest section 4.2), written from its
    description: an fp32 CPU Parameter (pinned when CUDA is present) indexed under autograd, the
    gathered rows cast to bf16 and copied to the GPU, emb[inverse] * scores summed over the bag;
    backward leaves a dense [R, V] CPU gradient; torch's AdamW steps the whole table on the CPU."""

    def __init__(self, n_rows: int, dim: int, device: torch.device, init: Tensor | None = None, weight_decay: float = WEIGHT_DECAY) -> None:
        self.device = device
        table = torch.empty(n_rows, dim, pin_memory=device.type == "cuda")
        if init is None:
            fill_normal_(table, dim**-0.5, seed=0)
        else:
            table.copy_(init)
        self.weight = nn.Parameter(table)
        # as measured in the digest (section 4.7): torch's fused AdamW, which has a CPU kernel since torch 2.4
        self.opt = torch.optim.AdamW([self.weight], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=True)

    def forward(self, rows_NL: Tensor, weights_NL: Tensor) -> Tensor:
        n_tokens, n_lookups = rows_NL.shape
        unique_U, inverse_P = torch.unique(rows_NL.flatten(), return_inverse=True)
        emb_UV = self.weight[unique_U.cpu()].to(torch.bfloat16).to(self.device, non_blocking=True)
        emb_NLV = emb_UV[inverse_P].view(n_tokens, n_lookups, -1)
        return (emb_NLV * weights_NL[..., None]).sum(1).to(weights_NL.dtype)

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_([self.weight], CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def value_grad(self) -> Tensor:
        return self.weight.grad.detach().clone()

    def table(self) -> Tensor:
        return self.weight.detach().clone()

    @staticmethod
    def host_bytes(n_rows: int, dim: int) -> int:
        return n_rows * dim * 4 * 4  # table, dense gradient, two moments

    def pcie_bytes(self, n_unique: int, dim: int) -> tuple[Bytes, Bytes, Bytes]:
        """ids to the CPU and bf16 rows to the GPU; bf16 row gradients back; the update stays on the CPU."""
        return (n_unique * dim * 2, n_unique * 8), (0, n_unique * dim * 2), (0, 0)


def make_lookups(n_rows: int, dim: int, n_tokens: int, n_lookups: int, device: torch.device, seed: int = 0):
    """rows [N, L] uniform in [0, R), softmax weights [N, L] (requiring grad, like scores), grad_out [N, V]."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (n_tokens, n_lookups), generator=gen).to(device)
    weights = torch.softmax(torch.randn(n_tokens, n_lookups, generator=gen), -1).to(device).requires_grad_()
    grad_out = torch.randn(n_tokens, dim, generator=gen).to(device)
    return rows, weights, grad_out


def check_parity(device: torch.device, transfers: list[str]) -> str:
    """Every candidate against the GPU-resident path at a small shape: forward output, value and
    score gradients, and the table after one update (zero-copy: the whole table, untouched rows
    included; the public approach updates every row by design, so only its touched rows)."""
    n_rows, dim, n_tokens, n_lookups = 4096, 96, 128, 24
    rows, weights, grad_out = make_lookups(n_rows, dim, n_tokens, n_lookups, device, seed=1)
    init = torch.randn(n_rows, dim, generator=torch.Generator().manual_seed(1)) * dim**-0.5
    touched = torch.unique(rows).cpu()
    tight = dict(rtol=1e-5, atol=1e-6)  # same fp32 math, possibly another device or summation order
    loose = dict(rtol=2e-2, atol=2e-2)  # rows read in bf16 (8 mantissa bits)
    update_tol = dict(rtol=1e-4, atol=1e-5)  # public: a first Adam step is ~ lr * sign(g), whatever g's rounding

    def run(candidate) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        weights.grad = None
        out = candidate.forward(rows, weights)
        out.backward(grad_out)
        results = out.detach().float().cpu(), candidate.value_grad(), weights.grad.detach().cpu()
        candidate.update()
        return (*results, candidate.table())

    ref_out, ref_gv, ref_gw, ref_table = run(GpuResident(n_rows, dim, device, init, weight_decay=0.1))
    checked = []
    variants = [(t, u) for t in transfers for u in (("device", "host") if t == transfers[0] else ("device",))]
    for transfer, update_on in variants:
        name = f"zero-copy {transfer} transfer, update on {update_on}"
        candidate = ZeroCopy(n_rows, dim, transfer, update_on, init, weight_decay=0.1)
        out, gv, gw, table = run(candidate)
        values_tol = tight if transfer == "fp32" else loose
        torch.testing.assert_close(out, ref_out, **values_tol, msg=lambda m: f"{name}: output\n{m}")
        torch.testing.assert_close(gv, ref_gv, **tight, msg=lambda m: f"{name}: value gradient\n{m}")
        torch.testing.assert_close(gw, ref_gw, **values_tol, msg=lambda m: f"{name}: score gradient\n{m}")
        torch.testing.assert_close(table, ref_table, **tight, msg=lambda m: f"{name}: table after one update\n{m}")
        low = candidate.values.host.low_precision
        if low is not None:
            # the copy is the master rounded once: 1 bf16 ulp allowed (the Triton interpreter rounds toward zero)
            torch.testing.assert_close(low.float(), table, rtol=2**-7, atol=0, msg=lambda m: f"{name}: bf16 copy of the updated table\n{m}")
        checked.append(name)
        del candidate
        _release()
    public = PublicApproach(n_rows, dim, device, init, weight_decay=0.1)
    out, gv, gw, table = run(public)
    torch.testing.assert_close(out, ref_out, **loose, msg=lambda m: f"public approach: output\n{m}")
    torch.testing.assert_close(gv, ref_gv, **loose, msg=lambda m: f"public approach: value gradient\n{m}")
    torch.testing.assert_close(gw, ref_gw, **loose, msg=lambda m: f"public approach: score gradient\n{m}")
    # Its gradients are summed in bf16 (per lookup, then per row), so where a row's contributions
    # nearly cancel the sign can flip and that element moves by ~lr the other way: at most ~2 lr
    # apart, and only for a few elements.
    moved = (table[touched] - ref_table[touched]).abs()
    far = (moved > update_tol["atol"] + update_tol["rtol"] * ref_table[touched].abs()).float().mean().item()
    if moved.max().item() > 2.5 * LR or far > 0.01:
        raise AssertionError(f"public approach: updated rows differ by up to {moved.max().item():.2e} ({100 * far:.2f}% of elements off)")
    del public
    _release()
    return (
        f"parity: {'; '.join(checked)}; public approach == GPU-resident (output, value and score gradients, "
        f"table after one update; {n_rows} x {dim}, {n_tokens} x {n_lookups} lookups, {device.type})"
    )


def pinned_copy_peak(device: torch.device, warmup: int, repeats: int) -> float | None:
    """GB/s of a pinned 1 GiB host->device torch copy; None without a GPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(GIB // 4, dtype=torch.float32, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    timing = time_fn("pinned H2D copy", lambda: dst.copy_(src, non_blocking=True), warmup, repeats)
    return GIB / (timing.median_ms * 1e-3) / GB


def _peak_gib() -> str:
    return f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if torch.cuda.is_available() else "n/a (CPU)"


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _add(*stages: Bytes) -> Bytes:
    return sum(s[0] for s in stages), sum(s[1] for s in stages)


def _rate(stage_bytes: Bytes, ms: float, peak: float | None) -> str:
    """Bytes over PCIe (both directions), their rate, and the floor: the busier direction at the
    pinned copy peak, with its share of the measured time."""
    n_bytes = sum(stage_bytes)
    if n_bytes == 0:
        return "0 B over PCIe"
    rate = n_bytes / (ms * 1e-3) / GB
    floor_ms = max(stage_bytes) / GB / peak * 1e3 if peak else 0.0
    share = f" (floor {floor_ms:.1f} ms at the pinned peak: {100 * floor_ms / ms:.0f}% of this time)" if peak else ""
    size = f"{n_bytes / GB:.2f} GB" if n_bytes >= GB / 10 else f"{n_bytes / 1e6:.2f} MB"
    return f"{size} over PCIe, {rate:.2f} GB/s{share}"


def stage_fns(candidate, rows: Tensor, weights: Tensor, grad_out: Tensor):
    """(forward, forward + backward, forward + backward + update) closures; each leaves no gradient behind."""

    def forward() -> None:
        candidate.forward(rows, weights)

    def forward_backward() -> None:
        candidate.forward(rows, weights).backward(grad_out)
        candidate.zero_grad()
        weights.grad = None

    def step() -> None:
        candidate.forward(rows, weights).backward(grad_out)
        candidate.update()
        weights.grad = None

    return forward, forward_backward, step


def _steps_peak(candidate, rows: Tensor, weights: Tensor, grad_out: Tensor) -> str:
    """Peak GPU memory over a few training steps of `candidate` on these lookups."""
    _reset_peak()
    time_fn("peak memory", stage_fns(candidate, rows, weights, grad_out)[2], warmup=1, repeats=2)
    return _peak_gib()


def buffer_line(n_rows: int, dim: int, n_lookups: int, n_unique: int, values: ZeroCopyValues) -> str:
    """The zero-copy forward's device buffer (kept for backward, fp32 rows) as its capacity stands
    after the timed steps (margin x the recent unique rows, read back without a host sync, at most
    min(N*L, R)), next to the bytes of the unique rows, the bound and a buffer per lookup."""
    chooser = values.capacity
    rows, bound = chooser.rows, min(n_lookups, n_rows)

    def size(n: int) -> str:
        return f"{n * dim * 4 / 2**20:.2f} MiB"

    return (
        f"zero-copy forward buffer: {rows} rows = {size(rows)} (capacity min(N*L, R, round_up({chooser.margin:g} x recent unique "
        f"rows, {capacity.ROUND_ROWS})), {chooser.overflow_calls} overflowing calls); unique rows {n_unique} = {size(n_unique)} "
        f"({100 * n_unique / max(rows, 1):.0f}% of the buffer); bound min(N*L, R) = {bound} rows = {size(bound)}; "
        f"one row per lookup would be {n_lookups} rows = {size(n_lookups)}"
    )


def host_fits(n_bytes: int) -> bool:
    return n_bytes <= 0.9 * available_host_bytes(shared=False)


def run_big(args, device: torch.device, peak: float | None) -> None:
    """Train a table 16x --rows (16M x 1024 by default: 64 GB fp32, more than an H100 holds) zero-copy
    for a few steps: time per step, peak GPU memory, and the probed rows must have moved."""
    n_rows = 16 * args.rows
    transfer = args.transfer or "fp32"
    available = available_host_bytes(shared=False)
    row_update = next((u for u in ("lazy", "rowwise_adagrad") if host_fits(ZeroCopy.host_bytes(n_rows, args.dim, transfer, u))), None)
    if row_update is None:
        need = ZeroCopy.host_bytes(n_rows, args.dim, transfer, "rowwise_adagrad")
        print(f"\nbig table: skipped, {n_rows} x {args.dim} needs {need / GIB:.1f} GiB of host memory, {available / GIB:.1f} GiB available")
        return
    need = ZeroCopy.host_bytes(n_rows, args.dim, transfer, row_update)
    gpu = f", GPU memory {torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB" if device.type == "cuda" else ""
    print(
        f"\nbig table: {n_rows} x {args.dim} fp32 master, {transfer} transfer, {row_update} update, "
        f"{need / GIB:.1f} GiB of host memory{gpu}"
    )
    try:  # an update rule the optimizer rejects fails here, before any host memory is taken
        AdamW([{"params": [nn.Parameter(torch.zeros(1, 1))], "row_update": row_update}], LR, BETAS, EPS, 0.0, fused=False)
        big = ZeroCopy(n_rows, args.dim, transfer, "device", row_update=row_update)
    except (ValueError, RuntimeError) as error:  # e.g. pinning refused
        print(f"big table: skipped, cannot build it: {type(error).__name__}: {error}")
        return
    rows, weights, grad_out = make_lookups(n_rows, args.dim, args.tokens, args.lookups, device, seed=2)
    probe = rows.flatten()[:16].unique().cpu()
    before = big.values.weight.detach()[probe].clone()
    _reset_peak()
    _, _, step = stage_fns(big, rows, weights, grad_out)
    timing = time_fn("zero-copy big table", step, warmup=1, repeats=3)
    _sync()
    after = big.values.weight.detach()[probe]
    moved = bool((after != before).any(dim=1).all())
    n_unique = torch.unique(rows).numel()
    forward_bytes, backward_bytes, update_bytes = big.pcie_bytes(n_unique, args.dim)
    print(
        f"big table: 4 steps trained (probed rows {'moved' if moved else 'DID NOT MOVE'}), fwd+bwd+update "
        f"{timing.median_ms:.1f} ms median of {timing.repeats}, {n_unique} unique rows"
        + (f", {_rate(_add(forward_bytes, backward_bytes, update_bytes), timing.median_ms, peak)}, peak GPU memory {_peak_gib()}"
           if device.type == "cuda" else "")
    )
    del big, rows, weights, grad_out
    _release()
    if not moved:
        raise SystemExit("big table: the update did not change the probed rows")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape for CPU")
    parser.add_argument("--rows", type=int, default=1024**2, help="table rows (n_keys^2)")
    parser.add_argument("--dim", type=int, default=1024, help="row width (v_dim)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--lookups", type=int, default=128, help="heads * knn per token")
    parser.add_argument("--transfer", choices=["fp32", "bf16"], help="zero-copy row transfer dtype (default: both)")
    parser.add_argument("--big", action="store_true", help="also train a 16x --rows table zero-copy (host memory permitting)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ref-repeats", type=int, default=3, help="repeats of the (slow) public approach")
    args = parser.parse_args(argv)
    full_size_needs_gpu(args.tiny, "benchmarks.zero_copy")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.rows, args.dim, args.tokens, args.lookups = 4096, 64, 64, 16

    transfers = [args.transfer] if args.transfer else ["fp32", "bf16"]
    print(check_parity(device, transfers))
    peak = pinned_copy_peak(device, args.warmup, args.repeats)
    _release()
    print(f"pinned host->device copy (1 GiB, torch): {f'{peak:.1f} GB/s' if peak else 'n/a (CPU)'}")

    rows, weights, grad_out = make_lookups(args.rows, args.dim, args.tokens, args.lookups, device)
    n_unique = torch.unique(rows).numel()
    buffer = "zero-copy forward buffer: not measured (the zero-copy candidate was skipped)"
    main_transfer = transfers[0]
    builders = {
        "zero-copy (update on device)": (lambda: ZeroCopy(args.rows, args.dim, main_transfer, "device"),
                                         ZeroCopy.host_bytes(args.rows, args.dim, main_transfer)),
        "zero-copy (update on host)": (lambda: ZeroCopy(args.rows, args.dim, main_transfer, "host"),
                                       ZeroCopy.host_bytes(args.rows, args.dim, main_transfer)),
    }
    if args.transfer is None:
        builders["zero-copy bf16 transfer"] = (
            lambda: ZeroCopy(args.rows, args.dim, "bf16", "device"), ZeroCopy.host_bytes(args.rows, args.dim, "bf16"),
        )
    builders["GPU-resident"] = (lambda: GpuResident(args.rows, args.dim, device), 0)
    builders["public approach"] = (lambda: PublicApproach(args.rows, args.dim, device), PublicApproach.host_bytes(args.rows, args.dim))

    stages: dict[str, list[Timing]] = {"forward": [], "forward + backward": [], "forward + backward + update": []}
    notes: dict[str, dict[str, str]] = {stage: {} for stage in stages}
    skipped: list[str] = []
    zero_copy_peaks: list[str] = []
    for name, (build, host_need) in builders.items():
        _release()
        if host_need and not host_fits(host_need):
            skipped.append(f"{name}: needs {host_need / GIB:.1f} GiB of host memory, {available_host_bytes(False) / GIB:.1f} GiB available")
            continue
        if name == "GPU-resident" and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            need = GpuResident.device_bytes(args.rows, args.dim) + 8 * min(n_unique, args.rows) * args.dim * 4  # + update workspace
            if need > free:
                skipped.append(
                    f"{name}: the table, its Adam state and workspace need ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB free on the GPU"
                )
                continue
        is_ref = name == "public approach"
        warmup, repeats = (min(args.warmup, 1), min(args.repeats, args.ref_repeats)) if is_ref else (args.warmup, args.repeats)
        try:
            candidate = build()
            _reset_peak()
            fns = stage_fns(candidate, rows, weights, grad_out)
            timings = [time_fn(name, fn, warmup, repeats) for fn in fns]
        except torch.cuda.OutOfMemoryError as error:  # freed by the _release() opening the next round
            candidate = fns = None
            skipped.append(f"{name}: out of GPU memory ({str(error).splitlines()[0]})")
            continue
        peak_memory = _peak_gib()
        bytes_fwd, bytes_bwd, bytes_update = candidate.pcie_bytes(n_unique, args.dim)
        stage_bytes = (bytes_fwd, _add(bytes_fwd, bytes_bwd), _add(bytes_fwd, bytes_bwd, bytes_update))
        for (stage, stage_timings), timing, n_bytes in zip(stages.items(), timings, stage_bytes):
            stage_timings.append(timing)
            on_gpu = f", {_rate(n_bytes, timing.median_ms, peak)}, peak GPU {peak_memory}" if device.type == "cuda" else ""
            notes[stage][name] = f"{n_unique} unique rows{on_gpu}"
        if name == "zero-copy (update on device)":
            buffer = buffer_line(args.rows, args.dim, rows.numel(), n_unique, candidate.values)
            # Peak GPU memory at two table sizes with the same lookups (rows < R/4, so both tables hold
            # them): only the table size changes, and the GPU memory must not.
            folded = rows % (args.rows // 4)
            zero_copy_peaks.append(f"{_steps_peak(candidate, folded, weights, grad_out)} with {args.rows} rows")
            candidate = fns = None
            _release()
            small = ZeroCopy(args.rows // 4, args.dim, main_transfer, "device")
            zero_copy_peaks.append(f"{_steps_peak(small, folded, weights, grad_out)} with {args.rows // 4} rows")
            del small, folded
        del candidate, fns
    _release()

    print(
        f"shape: table {args.rows} x {args.dim} fp32 master ({args.rows * args.dim * 4 / GIB:.2f} GiB), "
        f"{args.tokens} tokens x {args.lookups} lookups (uniform rows, softmax weights), {n_unique} unique rows; "
        f"zero-copy transfer {main_transfer}; lazy AdamW lr {LR}, clip {CLIP}"
        + ("; PCIe bytes are estimates (see pcie_bytes)" if device.type == "cuda" else "; on CPU: no transfers, a smoke test of this script")
    )
    print(buffer)
    for line in skipped:
        print(f"skipped {line}")
    for stage, stage_timings in stages.items():
        print(f"\n### {stage}")
        if any(t.name == "public approach" for t in stage_timings):
            print(format_table(stage_timings, reference="public approach", extra=notes[stage]))
        else:
            print("(the public approach was skipped: no ratios)")
            for t in stage_timings:
                print(f"| {t.name} | {t.median_ms:.3f} | {notes[stage][t.name]} |")
    if zero_copy_peaks and device.type == "cuda":
        print(f"\nzero-copy (update on device) peak GPU memory, same lookups (rows < {args.rows // 4}): {'; '.join(zero_copy_peaks)}")
    by_stage = {stage: {t.name: t.median_ms for t in ts} for stage, ts in stages.items()}
    if device.type != "cuda":
        print("goals: not checked on CPU (they are for one H100)")
    else:
        print_goals(by_stage)
    if args.big:
        run_big(args, device, peak)
    else:
        print("\n(--big: also train a 16x larger table zero-copy)")


def print_goals(by_stage: dict[str, dict[str, float]]) -> None:
    """The DESIGN.md goals of the zero-copy candidates, met or missed (GPU runs only)."""
    print(f"goals: forward <= {GOAL_FORWARD_MS:.0f} ms, fwd+bwd+update <= {GOAL_STEP_MS:.0f} ms, "
          "peak GPU memory independent of the table size")
    for name in by_stage["forward"]:
        if name.startswith("zero-copy"):
            forward_ms, step_ms = by_stage["forward"][name], by_stage["forward + backward + update"][name]
            print(
                f"  {name}: forward {forward_ms:.1f} ms ({'met' if forward_ms <= GOAL_FORWARD_MS else 'missed'}), "
                f"fwd+bwd+update {step_ms:.1f} ms ({'met' if step_ms <= GOAL_STEP_MS else 'missed'})"
            )


if __name__ == "__main__":
    main()
