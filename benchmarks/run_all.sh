#!/usr/bin/env bash
# Run the GPU checks and benchmarks one after another, keeping each one's output.
#
#   bash benchmarks/run_all.sh LOG_DIR                      # everything, in the order below
#   bash benchmarks/run_all.sh LOG_DIR pk_bag zero_copy     # some of them
#
# Names: kernels (the kernel and zero-copy tests on the GPU: compiled kernels against their torch
# references), pk_bag, zero_copy (with --big), leaky_average, mosaics_step, dense_step, pk_model,
# mosaics_v2.
# LOG_DIR/NAME.log holds each one's output, LOG_DIR/device.txt the GPU and versions, and
# LOG_DIR/summary.txt one line per name: ok, failed (exit status) or timed out.
# BENCH_TIMEOUT bounds each one (seconds, default 540); BENCH_ARGS is appended to every benchmark's
# arguments (BENCH_ARGS=--tiny: CPU shapes); PYTHON picks the interpreter (default .venv/bin/python
# if present, else python3). Exit status: the number of names that did not pass.
set -uo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log_dir=$1
shift
all=(kernels pk_bag zero_copy leaky_average mosaics_step dense_step pk_model mosaics_v2)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")
for name in "${names[@]}"; do
  case " ${all[*]} " in
    *" $name "*) ;;
    *) echo "run_all.sh: unknown name '$name' (known: ${all[*]})" >&2; exit 2 ;;
  esac
done
python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python_bin=$repo/.venv/bin/python; else python_bin=python3; fi
fi
limit=${BENCH_TIMEOUT:-540}
mkdir -p "$log_dir"
cd "$repo"
export PYTHONUNBUFFERED=1

command_for() {
  case $1 in
    kernels) echo "$python_bin -m pytest -q -p no:cacheprovider tests/test_embedding_bag.py tests/test_leaky_average.py tests/test_gated_scan.py tests/test_zero_copy.py" ;;
    zero_copy) echo "$python_bin -m benchmarks.zero_copy --big ${BENCH_ARGS:-}" ;;
    *) echo "$python_bin -m benchmarks.$1 ${BENCH_ARGS:-}" ;;
  esac
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python_bin" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git -C "$repo" log -1 --format="commit %h %s" 2>/dev/null
} > "$log_dir/device.txt" 2>&1
cat "$log_dir/device.txt"

failures=0
: > "$log_dir/summary.txt"
for name in "${names[@]}"; do
  command=$(command_for "$name")
  echo "=== $name: $command"
  start=$(date +%s)
  timeout --kill-after=20 "$limit" $command > "$log_dir/$name.log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  case $status in
    0) verdict=ok ;;
    124|137) verdict="timed out after ${limit}s" ;;
    *) verdict="failed (exit $status)" ;;
  esac
  [ "$status" -eq 0 ] || failures=$((failures + 1))
  echo "$name: $verdict, ${seconds}s" | tee -a "$log_dir/summary.txt"
  tail -n 40 "$log_dir/$name.log"
done
exit "$failures"
