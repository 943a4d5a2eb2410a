#!/usr/bin/env bash
# Evaluate the GPU-only run of agi_test/test_1 (its newest checkpoint) on hellaswag, piqa and nq_open.
#   bash agi_test/test_2/script/eval.sh                      # LIMIT=100 documents per task
#   LIMIT=1000 CKPT=runs/agi_test/test_1/gpu_only bash agi_test/test_2/script/eval.sh
#   bash agi_test/test_2/script/eval.sh 'harness.tasks=[synthetic_mc,synthetic_qa]'   # offline
# Extra arguments are config overrides. Results: $OUT/eval/<step>/results.json and results.md.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
CKPT="${CKPT:-runs/agi_test/test_1/gpu_only}"
OUT="${OUT:-runs/agi_test/test_2/gpu_only}"
LIMIT="${LIMIT:-100}"
exec "$PYTHON" -m apps.main.eval config=agi_test/test_2/config/eval.yaml \
    ckpt="$CKPT" dump_dir="$OUT" harness.limit="$LIMIT" "$@"
