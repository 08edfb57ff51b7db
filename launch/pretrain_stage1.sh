#!/usr/bin/env bash
''':'
# pretrain stage1: zhllama train --config configs/stage1.yaml, on one node or several (launch/common.sh).
#   bash launch/pretrain_stage1.sh [key=value ...]          # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/pretrain_stage1.sh   # node 0 (NODE_RANK=1 on node 1)
#   HOSTFILE=hostfile bash launch/pretrain_stage1.sh         # every node from node 0, over ssh
#   deepspeed --no_python launch/pretrain_stage1.sh, torchrun --no-python ..., srun (launch/slurm.sbatch):
#                                                   # an outer launcher; each rank trains itself
#   DETACH=1 bash launch/pretrain_stage1.sh                  # background, survives the terminal closing
#   DRY_RUN=1 bash launch/pretrain_stage1.sh                 # print the command, run nothing
# CONFIG overrides the YAML; docs/cluster.md explains every form.
# Also valid Python: plain `deepspeed launch/pretrain_stage1.sh` runs `python launch/pretrain_stage1.sh` on every
# rank. Python reads the bash part as a string and then imports launch/rank_entry.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$here/common.sh"
zhllama_launch pretrain_stage1 "${CONFIG:-$here/../configs/stage1.yaml}" "$@"
exit
'''  # '
import rank_entry  # noqa: E402,F401  (trains this rank and exits)
