#!/usr/bin/env bash
# agi_test/test_1, the zero_copy arm (see train.sh for the options: NPROC, QUICK, DUMP_DIR, overrides).
#   bash agi_test/test_1/script/zero_copy_train.sh [a.b=c ...]
exec bash "$(dirname "$0")/train.sh" zero_copy "$@"
