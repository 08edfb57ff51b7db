#!/usr/bin/env bash
# Shared by the launchers in launch/: builds the `deepspeed` command for one node or several and runs
# it with a log file per node. Source it, then call `zhllama_launch RUN_NAME CONFIG [key=value ...]`.
#
# Environment (all optional):
#   GPUS_PER_NODE  ranks on this node (default: number of GPUs from nvidia-smi; 2 with DS_ACCELERATOR=cpu)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank, 0..NNODES-1 (default 0); run the launcher on every node
#   MASTER_ADDR    address of node 0 (default 127.0.0.1), MASTER_PORT (default 29500)
#   HOSTFILE       a DeepSpeed hostfile ("host slots=8" lines): launch every node from node 0 over ssh
#                  (pdsh) instead of running the launcher on each node
#   LOG_DIR        where per-node logs go (default runs/logs)
#   DETACH=1       run in the background, immune to the terminal closing (setsid + nohup); prints
#                  the log file and the PID to follow
#   DS_ACCELERATOR=cpu   test mode without GPUs: CPU ranks, gloo backend
#   PYTHON         the python that has zhllama installed (default: python on PATH)
set -euo pipefail

zhllama_launch() {
  local run_name=$1 config=$2
  shift 2
  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0}
  local master_addr=${MASTER_ADDR:-127.0.0.1} master_port=${MASTER_PORT:-29500}
  local gpus=${GPUS_PER_NODE:-}
  if [ -z "$gpus" ]; then
    if [ "${DS_ACCELERATOR:-}" = "cpu" ]; then
      gpus=2
    elif command -v nvidia-smi >/dev/null 2>&1; then
      gpus=$(nvidia-smi -L | wc -l)
    else
      echo "launch: no GPU found (nvidia-smi missing); set GPUS_PER_NODE, or DS_ACCELERATOR=cpu for a CPU test" >&2
      return 2
    fi
  fi
  local log_dir=${LOG_DIR:-runs/logs}
  mkdir -p "$log_dir"
  local log_file="$log_dir/${run_name}_node${node_rank}.log"
  local py=${PYTHON:-python}
  local ds_bin
  ds_bin=$(dirname "$(command -v "$py")")/deepspeed
  [ -x "$ds_bin" ] || ds_bin=deepspeed

  local cmd=("$ds_bin")
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || { echo "launch: HOSTFILE $HOSTFILE not found" >&2; return 2; }
    cmd+=(--hostfile "$HOSTFILE" --master_addr "$master_addr" --master_port "$master_port")
  elif [ "$nnodes" -gt 1 ]; then
    # torchrun-style: the same command on every node, no ssh between nodes.
    cmd+=(--no_ssh --num_nodes "$nnodes" --node_rank "$node_rank" --num_gpus "$gpus"
          --master_addr "$master_addr" --master_port "$master_port")
  else
    cmd+=(--num_gpus "$gpus" --master_port "$master_port")
  fi
  cmd+=(--no_local_rank --module zhllama.cli train --config "$config" "$@")

  {
    echo "# $(date -u +%FT%TZ) node $node_rank/$nnodes, $gpus ranks per node, master $master_addr:$master_port"
    echo "# ${cmd[*]}"
  } >>"$log_file"
  if [ "${DETACH:-0}" = "1" ]; then
    setsid nohup "${cmd[@]}" >>"$log_file" 2>&1 < /dev/null &
    echo "launch: $run_name running in the background (pid $!); follow it with: tail -f $log_file"
  else
    echo "launch: $run_name, logging to $log_file"
    "${cmd[@]}" 2>&1 | tee -a "$log_file"
    return "${PIPESTATUS[0]}"
  fi
}
