#!/usr/bin/env bash
# sft: zhllama train --config configs/sft.yaml under the deepspeed launcher.
#   bash launch/sft.sh [key=value ...]                 # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/sft.sh    # on node 0 (and NODE_RANK=1 on node 1)
#   HOSTFILE=hostfile bash launch/sft.sh                # every node from node 0, over ssh
#   DETACH=1 bash launch/sft.sh                         # background, survives the terminal closing
# CONFIG overrides the YAML; see launch/common.sh for every variable.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$here/common.sh"
zhllama_launch sft "${CONFIG:-$here/../configs/sft.yaml}" "$@"
