#!/usr/bin/env bash
# Set up a virtualenv with everything zhllama needs, from scratch, on a fresh machine.
#   bash scripts/setup.sh            # creates .venv (or $ZHLLAMA_VENV)
# torch: if the environment has none, the CPU build is installed (pinned here, not in pyproject, so
# that GPU users keep their CUDA build). Set ZHLLAMA_TORCH to choose another spec.
# Also creates .venv-tf4 (or $ZHLLAMA_TF4_VENV): the oldest transformers zhllama declares (4.40) with
# tokenizers, sentencepiece, protobuf and jinja2, no torch, in which tests load the tokenizer files
# zhllama writes (tests/test_deploy_files.py). ZHLLAMA_SKIP_TF4=1 skips it.
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
if [ "${ZHLLAMA_SKIP_TF4:-0}" != 1 ]; then
  TF4=${ZHLLAMA_TF4_VENV:-.venv-tf4}
  if [ ! -x "$TF4/bin/python" ]; then
    echo "[setup] creating $TF4 (transformers 4.40, tokenizers only: for tokenizer-file checks)"
    "$PY" -m venv "$TF4"
  fi
  "$TF4/bin/python" -m pip install --quiet "transformers==4.40.*" tokenizers sentencepiece protobuf "jinja2>=3"
  "$TF4/bin/python" -c "import transformers; print('[setup]', '$TF4: transformers', transformers.__version__)" 2>&1 | grep '^\[setup\]'
fi
echo "[setup] done: . $VENV/bin/activate"
