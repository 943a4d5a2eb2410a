#!/usr/bin/env bash
# agi_test/test_1, the gpu_only arm (see train.sh for the options: NPROC, QUICK, DUMP_DIR, overrides).
#   bash agi_test/test_1/script/gpu_only_train.sh [a.b=c ...]
exec bash "$(dirname "$0")/train.sh" gpu_only "$@"
