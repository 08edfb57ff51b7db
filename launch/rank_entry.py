"""Train one rank when an outer launcher runs a launch/*.sh script with Python.

Plain `deepspeed launch/pretrain_stage1.sh` (no --no_python) starts `python launch/pretrain_stage1.sh`
on every rank with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. The scripts are
bash/Python polyglots whose Python part imports this module, which runs `zhllama train` with the
script's config, as the bash part does under `deepspeed --no_python`.
"""

import os
import sys
from pathlib import Path

from zhllama.app.cli import main

CONFIGS = {"pretrain_stage1.sh": "stage1.yaml", "pretrain_stage2.sh": "stage2.yaml", "sft.sh": "sft.yaml"}

script = Path(sys.argv[0]).resolve()
if script.name not in CONFIGS:
    sys.exit(f"launch: {script} is not one of the launch scripts {sorted(CONFIGS)}")
config = os.environ.get("CONFIG") or str(script.parent.parent / "configs" / CONFIGS[script.name])
sys.exit(main(["train", "--config", config, *sys.argv[1:]]))
