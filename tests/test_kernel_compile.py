"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) GPUs at the shapes its
launcher picks, and fits the chip's shared memory.

The interpreter runs kernels as numpy code and accepts some programs the compiler rejects (dot
shapes, dtype mixes in loops, constexpr misuse), so the value tests alone do not prove a kernel
builds. This test compiles each kernel ahead of time with Triton's own NVIDIA toolchain (ptxas
ships with Triton); no GPU is needed. The test runs this file in a subprocess without
TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled); `compile_all()`
prints one JSON line per kernel. The test splits the cases over one compiler process per core.

    python tests/test_kernel_compile.py          # the same report by hand (all cases, one process)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MEMORY_BYTES = {90: 232_448, 80: 166_912}  # per block: H100 / H200 (227 KiB), A100 (163 KiB)


def _cases():
    """(label, kernel, signature of runtime args, constexprs), the constexprs from the launchers."""
    import torch

    from lingua.mosaics.leaky_average import triton_scan
    from lingua.product_key.embedding_bag import triton_bag
    from lingua.precision import accumulation_dtype
    from lingua.product_key.zero_copy import kernels as zero_copy

    triton_type = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # float64: the gradchecks
        v = triton_type[dtype]
        acc_torch, acc = triton_bag._accumulation_dtypes(torch.empty(0, dtype=dtype, device="meta"))
        a = triton_type[acc_torch]
        # the overflow table (zero-copy: the host table): none, or the fp32 master / bf16 copy beside an fp32 buffer
        overflows = [(False, v)] + ([(True, "fp32"), (True, "bf16")] if v == "fp32" else [(True, v)])
        for dim in (1024, 96):
            block_d = triton_bag._block_d(dim)
            for has_overflow, t in overflows if dim == 1024 else overflows[:1]:  # overflow reads: the masks of D=96 are the plain kernels'
                second = {"T": f"*{t}", "T_ROWS": "*i64", "stride_t": "i32", "capacity": "i32"}
                name = f" overflow table {t}" if has_overflow else ""
                yield (
                    f"bag forward {v} D={dim}{name}",
                    triton_bag._bag_fwd_kernel,
                    {"V": f"*{v}", "IDX": "*i64", "W": f"*{a}", "OUT": f"*{v}", "L": "i32", "stride_v": "i32", **second},
                    {"D": dim, "OVERFLOW": has_overflow, "ACC": acc, "BLOCK_L": triton_bag.FWD_BLOCK_L, "BLOCK_D": block_d},
                )
                for want_gv, want_gw in ((True, True), (True, False), (False, True)):
                    if has_overflow and not want_gw:
                        continue  # the overflow table is read only for the score gradient
                    yield (
                        f"bag backward {v} D={dim} value-grad={want_gv} score-grad={want_gw}{name}",
                        triton_bag._bag_bwd_kernel,
                        {
                            "V": f"*{v}", "W": f"*{a}", "GO": f"*{v}", "ROWS": "*i64", "STARTS": "*i64", "COUNTS": "*i64",
                            "ORDER": "*i64", "GV": f"*{a}", "GW": f"*{a}", "L": "i32", "stride_v": "i32", **second,
                        },
                        {
                            "D": dim, "OVERFLOW": has_overflow, "WANT_GV": want_gv, "WANT_GW": want_gw, "ACC": acc,
                            "BLOCK_L": triton_bag.BWD_BLOCK_L, "BLOCK_D": block_d,
                        },
                    )
        if dtype == torch.float64:
            continue
        yield (
            f"host-row gather {v}",
            zero_copy._gather_rows_kernel,
            {"SRC": f"*{v}", "ROWS": "*i64", "OUT": f"*{v}", "n_slots": "i32", "stride_src": "i64"},
            {"D": 1024, "BLOCK_S": zero_copy.BLOCK_ROWS, "BLOCK_D": zero_copy._block_d(1024)},
        )
    yield (
        "host-row scatter",
        zero_copy._scatter_rows_kernel,
        {"DST": "*fp32", "ROWS": "*i64", "VALUES": "*fp32", "n_rows": "i32", "stride_dst": "i64"},
        {"D": 1024, "BLOCK_S": zero_copy.BLOCK_ROWS, "BLOCK_D": zero_copy._block_d(1024)},
    )
    for adam, has_low in ((True, True), (True, False), (False, True)):
        yield (
            f"host-row update, {'lazy Adam' if adam else 'rowwise Adagrad'}, bf16 copy={has_low}",
            zero_copy._update_rows_kernel,
            {
                "W": "*fp32", "LOW": "*bf16" if has_low else "*fp32", "M": "*fp32", "V": "*fp32", "ROWS": "*i64",
                "G": "*fp32", "BIAS_CORRECTION1": "*fp32", "BIAS_CORRECTION2_SQRT": "*fp32", "ADAGRAD_DENOMINATOR": "*fp32", "n_rows": "i32", "lr": "fp32", "decay": "fp32",
                "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
            },
            {"D": 1024, "ADAM": adam, "HAS_LOW": has_low, "BLOCK_S": zero_copy.BLOCK_ROWS, "BLOCK_D": zero_copy._block_d(1024)},
        )
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.empty(1, 1, 768, dtype=dtype, device="meta")
        chunk = triton_scan.MAX_CHUNK_SIZE  # the largest tiles
        cfg = triton_scan._launch_config(x, n_heads=12, chunk_size=chunk)
        x_t, a = triton_type[dtype], triton_type[cfg["acc"]]
        for ema in (True, False):
            common = {
                "C": 768, "D": cfg["D"], "EMA": ema, "BT": chunk, "BC": cfg["BC"],
                "DOT_DTYPE": cfg["DOT_DTYPE"], "PRECISION": cfg["PRECISION"],
            }
            yield (
                f"leaky scan forward {x_t} ema={ema}",
                triton_scan._scan_fwd_kernel,
                {"x_ptr": f"*{x_t}", "beta_ptr": f"*{a}", "y_ptr": f"*{x_t}", "states_ptr": f"*{a}", "T": "i32", "NT": "i32"},
                common,
            )
            yield (
                f"leaky scan backward {x_t} ema={ema}",
                triton_scan._scan_bwd_kernel,
                {
                    "g_ptr": f"*{x_t}", "x_ptr": f"*{x_t}", "beta_ptr": f"*{a}", "states_ptr": f"*{a}",
                    "dx_ptr": f"*{x_t}", "dbeta_ptr": f"*{a}", "T": "i32", "NT": "i32",
                },
                {**common, "NCB": cfg["NCB"]},
            )
    from lingua.mosaics.gated_scan import MAX_CHUNK_SIZE, triton_scan as gated_scan

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.empty(1, 1, 2048, dtype=dtype, device="meta")  # v2 small: 16 heads of 128
        cfg = gated_scan.launch_config(x, n_heads=16, chunk_size=MAX_CHUNK_SIZE)
        x_t, a = triton_type[dtype], triton_type[accumulation_dtype(dtype)]
        inputs = {"x_ptr": f"*{x_t}", "g_ptr": f"*{x_t}", "d_ptr": f"*{x_t}", "doc_ptr": "*u8"}
        scalars = {"T": "i32", "NT": "i32", "eps": "fp32"}
        for has_doc in (True, False) if dtype == torch.bfloat16 else (True,):  # bf16: what training runs
            yield (
                f"gated key scan forward {x_t} documents={has_doc}",
                gated_scan._gated_fwd_kernel,
                {**inputs, "k_ptr": f"*{x_t}", "m_states_ptr": f"*{a}", "s_states_ptr": f"*{a}", **scalars},
                {**cfg, "HAS_DOC": has_doc},
            )
            yield (
                f"gated key scan backward {x_t} documents={has_doc}",
                gated_scan._gated_bwd_kernel,
                {
                    "dk_ptr": f"*{x_t}", **inputs, "m_states_ptr": f"*{a}", "s_states_ptr": f"*{a}",
                    "dx_ptr": f"*{x_t}", "dg_ptr": f"*{x_t}", "dd_ptr": f"*{x_t}", **scalars,
                },
                {**cfg, "HAS_DOC": has_doc},
            )


def compile_all(shard: int = 0, n_shards: int = 1) -> None:
    """Compile every `n_shards`-th (arch, case) pair starting at `shard`; one JSON line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jobs = [(arch, case) for arch in SHARED_MEMORY_BYTES for case in _cases()]
    for arch, (label, kernel, runtime_args, constexprs) in jobs[shard::n_shards]:
        target = GPUTarget("cuda", arch, 32)
        constexprs = dict(constexprs)
        options = {key: constexprs.pop(key) for key in ("num_warps", "num_stages") if key in constexprs}  # launch options
        signature = {name: "constexpr" if name in constexprs else runtime_args[name] for name in kernel.arg_names}
        report = {"kernel": label, "arch": arch}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            report.update(ok=True, shared=compiled.metadata.shared)
        except Exception as error:  # noqa: BLE001 - reported, and the test fails on it
            report.update(ok=False, error=f"{type(error).__name__}: {error}"[:4000])
        print(json.dumps(report), flush=True)


def _nvidia_toolchain_present() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:  # no triton, or no triton.backends
        return False


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_and_ampere() -> None:
    if not _nvidia_toolchain_present():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    n_shards = max(1, min(4, os.cpu_count() or 1))  # ptxas is single-threaded: one compiler process per core
    shards = [
        subprocess.Popen([sys.executable, __file__, str(shard), str(n_shards)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for shard in range(n_shards)
    ]
    reports = []
    try:
        for shard in shards:
            stdout, stderr = shard.communicate(timeout=600)
            assert shard.returncode == 0, stderr[-4000:]
            reports += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    finally:
        for shard in shards:
            shard.kill()
    assert len(reports) == len(SHARED_MEMORY_BYTES) * len(list(_cases())), reports  # every case reported
    failed = [r for r in reports if not r["ok"]]
    assert not failed, "\n".join(f"sm_{r['arch']} {r['kernel']}: {r['error']}" for r in failed)
    too_big = [r for r in reports if r["shared"] > SHARED_MEMORY_BYTES[r["arch"]]]
    assert not too_big, f"over the shared memory of a block: {too_big}"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    compile_all(*(int(arg) for arg in sys.argv[1:3]))
