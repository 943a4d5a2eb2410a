#!/usr/bin/env bash
# Create (if missing) and fill the Python environment lingua runs in.
#
#   bash setup/create_env.sh            # .venv in the repository root
#   LINGUA_ENV=/path/to/env bash setup/create_env.sh
#   LINGUA_EXTRAS=dev,hf,gpu bash setup/create_env.sh   (default: dev,hf)
#
# An installed torch is never replaced: its version (and the triton it expects) go into a
# constraints file every later pip call obeys. With no torch present, TORCH_SPEC
# (default torch==2.13.0) is installed first. Safe to run again: it only installs what is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=${LINGUA_ENV:-$repo/.venv}
extras=${LINGUA_EXTRAS:-dev,hf}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python_bin=${PYTHON:-python3}

if [ ! -x "$env_dir/bin/python" ]; then
  echo "[create_env] creating $env_dir"
  "$python_bin" -m venv "$env_dir"
fi
py="$env_dir/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[create_env] installing $torch_spec"
  "${pip[@]}" install "$torch_spec"
fi

constraints="$env_dir/lingua-constraints.txt"
"$py" "$repo/setup/torch_constraints.py" > "$constraints"
echo "[create_env] pinned: $(tr '\n' ' ' < "$constraints")"

stamp="$env_dir/.lingua-installed"
want=$(cat "$repo/pyproject.toml" "$constraints"; echo "$extras")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import lingua" 2>/dev/null; then
  echo "[create_env] $env_dir is up to date"
  exit 0
fi
echo "[create_env] installing lingua[$extras] into $env_dir"
PIP_CONSTRAINT="$constraints" "${pip[@]}" install -e "$repo[$extras]"
printf '%s' "$want" > "$stamp"
echo "[create_env] done: $("$py" -c 'import torch; print("torch", torch.__version__)')"
