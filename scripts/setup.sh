#!/usr/bin/env bash
# Set up a virtualenv with everything zhllama needs, from scratch, on a fresh machine.
#   bash scripts/setup.sh            # creates .venv (or $ZHLLAMA_VENV)
# torch: if the environment has none, the CPU build is installed (pinned here, not in pyproject, so
# that GPU users keep their CUDA build). Set ZHLLAMA_TORCH to choose another spec.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZHLLAMA_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  TORCH_SPEC=${ZHLLAMA_TORCH:-torch==2.13.0}
  echo "[setup] installing $TORCH_SPEC"
  python -m pip install --quiet "$TORCH_SPEC"
fi
echo "[setup] installing zhllama and its dependencies"
python -m pip install --quiet -e ".[dev]"
python -c "import torch, transformers, peft, deepspeed, sentencepiece; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep '^\[setup\]'
echo "[setup] done: . $VENV/bin/activate"
