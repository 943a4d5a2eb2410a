#!/usr/bin/env bash
# agi_test/test_1, one arm: train config/<arm>.yaml, arm = zero_copy (value table in host memory)
# or gpu_only (value table in GPU memory). zero_copy_train.sh and gpu_only_train.sh call this.
#   bash agi_test/test_1/script/train.sh zero_copy                       # runs/agi_test/test_1/zero_copy
#   NPROC=8 bash agi_test/test_1/script/train.sh zero_copy               # torchrun, 8 processes
#   bash agi_test/test_1/script/train.sh zero_copy model.productkey_args.mem_n_keys=4096 steps=500
#   QUICK=1 bash agi_test/test_1/script/train.sh zero_copy               # tiny model, ~10 s on a 2-core CPU
# Without QUICK=1 a machine with no GPU is refused at once (exit 2), naming QUICK=1.
# Extra arguments are config overrides (a.b=c). DUMP_DIR sets the run folder, PYTHON the interpreter
# (default: .venv/bin/python when present). Compare the two arms: python -m agi_test.test_1.compare
set -euo pipefail
cd "$(dirname "$0")/../../.."
ARM="${1:?usage: train.sh zero_copy|gpu_only [overrides...]}"
shift
case "$ARM" in zero_copy | gpu_only) ;; *) echo "arm=$ARM: use zero_copy or gpu_only" >&2; exit 2 ;; esac
CONFIG="agi_test/test_1/config/$ARM.yaml"
DUMP_DIR="${DUMP_DIR:-runs/agi_test/test_1/$ARM}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
NPROC="${NPROC:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

ARGS=(config="$CONFIG" dump_dir="$DUMP_DIR")
if [ "${QUICK:-0}" = "1" ]; then
    # A first look on a laptop CPU: a tiny model with the same structure (memory layer, shared
    # table, the same arm), 30 steps. Later arguments still override these.
    ARGS+=(
        model.n_layers=4 model.dim=64 model.n_heads=4
        model.productkey_args.layers=2 model.productkey_args.mem_n_keys=64 model.productkey_args.mem_k_dim=64
        data.seq_len=128 data.batch_size=4 data.prefetch_size=8
        steps=30 optim.warmup=5 optim.lr=3e-3
        validation.every=15 validation.max_batches=2 logging.freq=5 checkpoint.dump.every=0
    )
fi

if [ "${QUICK:-0}" != "1" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # The full-size arm (a 24-layer model with a large memory table, thousands of steps) would take
    # days on a CPU and measure nothing the experiment is about.
    echo "agi_test/test_1: the full-size $ARM arm ($CONFIG) needs a GPU and this machine has none; nothing was run." >&2
    echo "On CPU run the tiny version (same structure, about 10 s): QUICK=1 bash agi_test/test_1/script/${ARM}_train.sh" >&2
    exit 2
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "NPROC=$NPROC: give a positive number of processes" >&2
    exit 2
fi
if [ "$NPROC" -gt 1 ]; then
    # torchrun, run through the same interpreter (the environment need not be activated)
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m apps.main.train "${ARGS[@]}" "$@"
fi
exec "$PYTHON" -m apps.main.train "${ARGS[@]}" "$@"
