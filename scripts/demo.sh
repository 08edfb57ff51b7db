#!/usr/bin/env bash
# The main job: set everything up, then run the whole zhllama pipeline on a tiny model and the text
# bundled with zhllama, on CPU, offline (after setup), in about 10 minutes on 2 cores.
#   bash scripts/demo.sh                    # everything into runs/demo
#   bash scripts/demo.sh --quick            # fewer training steps (what the tests run)
#   bash scripts/demo.sh --force stage2     # redo from a step; any `zhllama demo` option works
# Run it again and the finished steps are reused. See `zhllama demo --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ZHLLAMA_VENV:-.venv}/bin/activate"
# The loss-curve PNG needs matplotlib (in .[dev], which setup.sh installs; checked for other setups).
python -c "import matplotlib" 2>/dev/null || python -m pip install --quiet "matplotlib>=3.5"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
exec zhllama demo "$@"
