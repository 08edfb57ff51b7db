#!/usr/bin/env bash
# Shared by the launchers in launch/: picks how to start `zhllama train` on this node and runs it.
# Source it, then call `zhllama_launch RUN_NAME CONFIG [key=value ...]`.
#
# Four forms, chosen from the environment (docs/cluster.md explains each):
#   under an outer launcher  RANK and LOCAL_RANK already set (deepspeed --no_python, torchrun
#                            --no-python, srun via launch/slurm.sbatch): train this one rank, no nesting
#   HOSTFILE=file            every node from this one, DeepSpeed's launcher over ssh (pdsh)
#   NNODES>1                 the same command on every node, no ssh: torchrun's static rendezvous
#   otherwise                one node: DeepSpeed's launcher with one rank per GPU
#
# Environment (all optional unless said):
#   GPUS_PER_NODE  ranks on this node (default: the GPUs in CUDA_VISIBLE_DEVICES, else nvidia-smi's
#                  count; 2 with DS_ACCELERATOR=cpu)
#   NNODES         number of nodes (default 1); with NNODES>1, NODE_RANK (0..NNODES-1) and
#                  MASTER_ADDR (node 0's address) are required
#   MASTER_ADDR    address of node 0; MASTER_PORT (default 29500)
#   HOSTFILE       a DeepSpeed hostfile ("host slots=8" lines); MASTER_ADDR unset: DeepSpeed asks the
#                  first host for its address over ssh
#   LAUNCHER_ARGS  extra arguments for the launcher (e.g. "--no_ssh_check", "--launcher openmpi")
#   LOG_DIR        where per-node logs go (default runs/logs)
#   DETACH=1       run in the background, immune to the terminal closing (setsid + nohup); prints
#                  the log file and the PID to follow
#   DRY_RUN=1      print the command this node would run, and exit
#   DS_ACCELERATOR=cpu   test mode without GPUs: CPU ranks, gloo backend
#   PYTHON         the python that has zhllama installed (default: python on PATH)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_*, GLOO_SOCKET_IFNAME, UCX_*   the network the ranks use: taken
#                  from this environment to every rank (each form's way is in docs/cluster.md) and
#                  printed at start
#
# Written for bash 4.2 (CentOS 7 login nodes): a possibly empty array is expanded as
# ${a[@]+"${a[@]}"}, because "${a[@]}" of an empty array is an unbound variable under set -u before 4.4.
set -euo pipefail

_launch_fail() { echo "launch: $*" >&2; return 2; }

# Ranks on this node: GPUS_PER_NODE, else the visible GPUs, else what nvidia-smi sees.
_launch_local_ranks() {
  if [ -n "${GPUS_PER_NODE:-}" ]; then
    echo "$GPUS_PER_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif [ "${DS_ACCELERATOR:-}" = "cpu" ]; then
    echo 2
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  else
    _launch_fail "no GPU found (nvidia-smi missing); set GPUS_PER_NODE, or DS_ACCELERATOR=cpu for a CPU test"
  fi
}

# The network variables set here, as NAME=value words (empty when none is set).
_launch_network_env() {
  local v out=()
  for v in $(compgen -e | LC_ALL=C sort); do
    case $v in NCCL_*|GLOO_SOCKET_IFNAME|UCX_*|TP_SOCKET_IFNAME) out+=("$v=${!v}") ;; esac
  done
  echo ${out[@]+"${out[@]}"}
}

_launch_say_network() {
  local net
  net=$(_launch_network_env)
  echo "launch: network settings for every rank: ${net:-none set (NCCL picks the interface itself)}" >&2
}

# Runs "$@" (or prints it under DRY_RUN=1), teeing its output to the node's log file.
_launch_run() {
  local log_file=$1
  shift
  _launch_say_network
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  mkdir -p "$(dirname "$log_file")"
  echo "# $(date -u +%FT%TZ) $*" >>"$log_file"
  if [ "${DETACH:-0}" = "1" ]; then
    setsid nohup "$@" >>"$log_file" 2>&1 </dev/null &
    echo "launch: running in the background (pid $!); follow it with: tail -f $log_file"
  else
    echo "launch: logging to $log_file"
    "$@" 2>&1 | tee -a "$log_file"
    return "${PIPESTATUS[0]}"
  fi
}

zhllama_launch() {
  local run_name=$1 config=$2
  shift 2
  local py=${PYTHON:-python}
  # The module and its arguments; the launchers take it as --module, python as -m.
  local train=(zhllama.app.cli train --config "$config" "$@")
  local -a extra=()
  read -r -a extra <<<"${LAUNCHER_ARGS:-}"
  local master_port=${MASTER_PORT:-29500}

  # 1. Under an outer launcher: it already started one process per rank, so this process trains
  #    its rank. Starting another launcher here would nest one launcher per rank.
  if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
    local v
    for v in WORLD_SIZE MASTER_ADDR MASTER_PORT; do
      [ -n "${!v:-}" ] || _launch_fail "RANK is set (an outer launcher started this rank) but $v is not; set it, or unset RANK to let this script start the ranks" || return
    done
    [ "$LOCAL_RANK" != 0 ] || _launch_say_network  # once per node
    if [ "${DRY_RUN:-0}" = "1" ]; then
      printf '%q ' "$py" -m "${train[@]}"
      echo
      return 0
    fi
    exec "$py" -m "${train[@]}"
  fi

  # The `deepspeed` command, run by this python so that the ranks it starts use the same one.
  local ds=("$py" -m deepspeed.launcher.runner)
  local log_dir=${LOG_DIR:-runs/logs}

  # 2. A hostfile: DeepSpeed starts every node from here over ssh (pdsh).
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || _launch_fail "HOSTFILE $HOSTFILE not found" || return
    local cmd=("${ds[@]}" --hostfile "$HOSTFILE" --master_port "$master_port")
    [ -z "${MASTER_ADDR:-}" ] || cmd+=(--master_addr "$MASTER_ADDR")
    _launch_run "$log_dir/${run_name}_node0.log" "${cmd[@]}" ${extra[@]+"${extra[@]}"} --no_local_rank --module "${train[@]}"
    return
  fi

  local gpus
  gpus=$(_launch_local_ranks) || return
  local nnodes=${NNODES:-1}

  # 3. Several nodes, no ssh: the same command on each node. torchrun's static rendezvous needs
  #    only node 0's address and this node's rank (DeepSpeed 0.19's --no_ssh also wants a hostfile).
  if [ "$nnodes" -gt 1 ]; then
    [ -n "${NODE_RANK:-}" ] || _launch_fail "NNODES=$nnodes needs NODE_RANK (0..$((nnodes - 1))) on every node" || return
    [ -n "${MASTER_ADDR:-}" ] || _launch_fail "NNODES=$nnodes needs MASTER_ADDR, the address of node 0" || return
    local cmd=("$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$NODE_RANK"
               --nproc_per_node "$gpus" --master_addr "$MASTER_ADDR" --master_port "$master_port")
    _launch_run "$log_dir/${run_name}_node${NODE_RANK}.log" "${cmd[@]}" ${extra[@]+"${extra[@]}"} --module "${train[@]}"
    return
  fi

  # 4. One node: DeepSpeed's launcher, one rank per GPU. With CUDA_VISIBLE_DEVICES set, the ranks
  #    go on those GPUs (DeepSpeed ignores the variable once --num_gpus is given).
  local cmd=("${ds[@]}" --master_port "$master_port")
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    [ "$gpus" -le "${#ids[@]}" ] || _launch_fail "GPUS_PER_NODE=$gpus but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES has ${#ids[@]}" || return
    local chosen
    chosen=$(IFS=,; echo "${ids[*]:0:$gpus}")
    cmd+=(--include "localhost:$chosen")
  else
    cmd+=(--num_gpus "$gpus")
  fi
  _launch_run "$log_dir/${run_name}_node0.log" "${cmd[@]}" ${extra[@]+"${extra[@]}"} --no_local_rank --module "${train[@]}"
}
