#!/usr/bin/env bash
# The GPU path end to end on one GPU of 80 GB or more, on a bare node with no network, in about
# 8 minutes including the install: bf16 stage 1 (its last step NaN: skipped, never checkpointed),
# stage 2 (SIGKILLed after a checkpoint, restarted, compared with an uninterrupted run; and again with
# overlap_comm off, whose losses must agree), and packed SFT, on a model of LLaMA-7B width (hidden
# 4096, intermediate 11008, 32 heads) with 2 layers and the merged vocabulary (random weights).
# Writes its table (stage, loss, tokens/s, MFU, peak memory against `zhllama plan`, checkpoint size)
# and its checks (resume equality, the NaN step, overlap_comm, fp32 rotary buffers) to
# DIR/gpu_check.md and DIR/gpu_check.json; exits non-zero on any failure.
#   bash scripts/gpu_check.sh --bundle OUT [--out DIR]   # install from OUT (scripts/offline_bundle.sh)
#                                                        # into DIR/env, offline; DIR default runs/gpu_check
#   bash scripts/gpu_check.sh [--out DIR]                # zhllama and DeepSpeed already installed
#   bash scripts/gpu_check.sh ... --cpu-smoke            # the same steps on CPU ranks, tiny width, fp32
#   bash scripts/gpu_check.sh ... --dry-run              # print every command, run nothing
# Runs from the repository alone: the two reference tokenizers come from the bundle (OUT/tokenizers);
# without them, stand-ins are built from the repository's text (a smaller vocabulary, said in the
# table). Text: the bundled zhllama/data samples. Disk: each run's checkpoints are measured, then
# removed, so the check stays under 20 GB. GPU=0 picks the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
usage="usage: bash scripts/gpu_check.sh [--bundle OUT] [--out DIR] [--cpu-smoke] [--dry-run]"

dry=0 smoke=0 bundle="" work=${WORK:-runs/gpu_check}
while [ $# -gt 0 ]; do
  case $1 in
    --bundle) bundle=${2:?$usage}; shift 2 ;;
    --out) work=${2:?$usage}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --cpu-smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
# LLaMA-7B width, 2 layers; the smoke run keeps the vocabulary and shrinks the width.
hidden=4096 intermediate=11008 heads=32 layers=2 precision=bf16
steps=12 kill_after=6 micro=8 global=32 block=512
if [ "$smoke" = 1 ]; then
  hidden=64 intermediate=176 heads=4 precision=fp32
  steps=6 kill_after=2 micro=2 global=4 block=64
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
steps=${STEPS:-$steps}                # optimizer steps per stage
kill_after=${KILL_AFTER:-$kill_after} # stage 2's checkpoint; it is SIGKILLed 2 steps later
gpu=${GPU:-0}
py=${PYTHON:-python}
export GPUS_PER_NODE=1 LOG_DIR=$work/logs TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PIP_NO_INDEX=1
if [ "$smoke" = 0 ]; then export CUDA_VISIBLE_DEVICES=$gpu; else unset CUDA_VISIBLE_DEVICES; fi
common=("max_steps=$steps" "global_batch=$global" "micro_batch=$micro" "precision=$precision" "block_size=$block"
        "eval_every=0" "tensorboard=false" "log_every=4")
failures=()

say() { echo "gpu_check: $*"; }
fail() { failures+=("$1"); say "FAILED: $1"; }
run() {  # run CMD...: print it; run it unless --dry-run
  printf '+ '; printf '%q ' "$@"; echo
  [ "$dry" = 1 ] || "$@"
}

# Peak GPU memory of one stage: nvidia-smi samples every 200 ms in the background.
mem_start() {
  [ "$dry$smoke" = 00 ] || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" -lms 200 >"$work/mem_$1.csv" &
  echo $! >"$work/mem_$1.pid"
}
mem_stop() {
  [ "$dry$smoke" = 00 ] || return 0
  kill "$(cat "$work/mem_$1.pid")" 2>/dev/null || true
}

# ------------------------------------------------------------------------- 0. install, offline
[ "$dry" = 1 ] || { rm -rf "$work"; mkdir -p "$work/logs"; }
start=$(date +%s)
if [ -n "$bundle" ]; then
  [ "$dry" = 1 ] || [ -f "$bundle/MANIFEST.json" ] || { echo "gpu_check.sh: $bundle/MANIFEST.json not found (make the bundle with scripts/offline_bundle.sh)" >&2; exit 2; }
  if [ "$dry" = 0 ]; then
    want=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["python"])' "$bundle/MANIFEST.json")
    have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$want" = "$have" ] || { echo "gpu_check.sh: the bundle is for Python $want, this python ($py) is $have" >&2; exit 2; }
  fi
  # A folder of its own: a virtualenv without packages of its own that sees the node's (torch,
  # transformers, peft, and pip itself) through a .pth file, so pip, run by it, installs only what is
  # missing, into it, and never touches the node's packages.
  env_dir=$work/env
  run "$py" -m venv --without-pip "$env_dir"
  node_sites='import site, sysconfig; p = sysconfig.get_paths(); print("\n".join(dict.fromkeys([p["purelib"], p["platlib"], *site.getsitepackages()])))'
  if [ "$dry" = 0 ]; then
    "$py" -c "$node_sites" >"$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_node_packages.pth"
    "$env_dir/bin/python" -c "import pip" 2>/dev/null || { echo "gpu_check.sh: $py has no pip to install the bundle with" >&2; exit 2; }
  fi
  pip_cmd=("$env_dir/bin/python" -m pip)
  run "${pip_cmd[@]}" install --quiet --no-index --find-links "$bundle" -r "$bundle/requirements.txt"
  run "${pip_cmd[@]}" install --quiet --no-index --find-links "$bundle" --no-deps zhllama
  py=$env_dir/bin/python
  # The installed zhllama, not the checkout's zhllama/ folder that `python -m`/`-c` would find first
  # in the working directory (the stages are mapped under zhllama only when installed).
  export PATH="$env_dir/bin:$PATH" PYTHONSAFEPATH=1
  tokenizers=$bundle/tokenizers
else
  tokenizers=${ZHLLAMA_TOKENIZERS:-}
fi
export PYTHON=$py
install_s=$(($(date +%s) - start))

# ------------------------------------------------------------------------- 1. inputs
llama_sp=$tokenizers/llama_tokenizer.model zh_sp=$tokenizers/chinese_llama_sp.model vocab_note="reference tokenizers"
if [ -z "$tokenizers" ] || [ ! -f "$llama_sp" ] || [ ! -f "$zh_sp" ]; then
  # Stand-ins from the repository's text: a LLaMA-style BPE on the English sample, zhllama's own
  # Chinese SentencePiece on the Chinese sample.
  vocab_note="stand-in tokenizers built from zhllama/data (no reference tokenizers in the bundle)"
  llama_sp=$work/standin/llama_tokenizer.model zh_sp=$work/standin/zh_sp.model
  run "$py" -c "import sys; from pathlib import Path; from zhllama.tiny import make_tiny_sp
make_tiny_sp(sys.argv[1], text=Path(sys.argv[2]).read_text(encoding='utf-8'), vocab_size=4000, seed_lines=1)" \
    "$llama_sp" "$repo/zhllama/data/en_sample.txt"
  run zhllama vocab train --input "$repo/zhllama/data/zh_sample.txt" --vocab-size 3000 --out "$work/standin"
fi
text=$repo/zhllama/data/zh_sample.txt
sft_data=$repo/zhllama/data/sft_zh.jsonl
if [ "$dry" = 1 ]; then
  gpu_name="NVIDIA H100 80GB HBM3 (dry run)"
elif [ "$smoke" = 1 ]; then
  gpu_name="CPU (smoke run, no GPU)"
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: nvidia-smi not found: this check needs a GPU" >&2; exit 2; }
  mem_total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "$gpu")
  [ "$mem_total" -ge 79000 ] || { echo "gpu_check.sh: GPU $gpu has $mem_total MiB; needs 80 GB" >&2; exit 2; }
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$gpu")
fi
case $gpu_name in
  *H200*) plan_gpu=h200 ;; *H100*) plan_gpu=h100 ;; *H800*) plan_gpu=h800 ;; *H20*) plan_gpu=h20 ;;
  *A800*) plan_gpu=a800 ;; *) plan_gpu=a100-80g ;;
esac
say "$gpu_name (plan as $plan_gpu), work dir $work, $vocab_note"

# ------------------------------------------------------------------------- 2. model and data
run zhllama vocab merge --base "$llama_sp" --add "$zh_sp" --compat v1 --out "$work/tokenizer"
run "$py" -c "
import sys
import torch
from transformers import LlamaForCausalLM
from zhllama.modelio import load_tokenizer, save_tokenizer
from zhllama.tiny import tiny_llama_config
tok = load_tokenizer(sys.argv[2])
cfg = tiny_llama_config(len(tok), hidden_size=$hidden, intermediate_size=$intermediate, num_heads=$heads,
                        num_layers=$layers, max_position_embeddings=$block)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16 if '$precision' == 'bf16' else torch.float32).save_pretrained(sys.argv[1])
save_tokenizer(tok, sys.argv[1])
" "$work/base" "$llama_sp"
run zhllama vocab resize --model "$work/base" --tokenizer "$work/tokenizer" --out "$work/model"
rm -rf "$work/base"
run zhllama data pack --tokenizer "$work/tokenizer" --input "$text" --block-size "$block" --out "$work/packed" \
  --workers 2 --validation-ratio 0.01
# stage 2 with overlap_comm off: the stage's own DeepSpeed config with that one key changed
run "$py" -c "
import json, sys
from zhllama.pretrain.ds_config import resolve_ds_config, stage_ds_config
cfg = json.loads(resolve_ds_config(stage_ds_config('stage2')).read_text())
cfg['zero_optimization']['overlap_comm'] = False
open(sys.argv[1], 'w').write(json.dumps(cfg))
" "$work/no_overlap.json"

# ------------------------------------------------------------------------- 3. plan
for s in stage1 stage2 sft; do
  plan_cmd=(zhllama plan --model "$work/model" --stage "$s" --tokens 1e6 --gpus 1 --gpu "$plan_gpu" --micro-batch "$micro"
            --seq-len "$block" --global-batch "$global" --json)
  printf '+ '; printf '%q ' "${plan_cmd[@]}"; echo "> $work/plan_$s.json"
  [ "$dry" = 1 ] || "${plan_cmd[@]}" >"$work/plan_$s.json" || fail "plan $s"
done

# ------------------------------------------------------------------------- 4. train
stage_env=()
stage() {  # stage NAME LAUNCHER key=value...: one run (with stage_env), its GPU memory sampled
  local name=$1 script=$2 t0
  shift 2
  mem_start "$name"
  t0=$(date +%s)
  run env ${stage_env[@]+"${stage_env[@]}"} bash "launch/$script" "$@" || fail "$name exited non-zero"
  [ "$dry" = 1 ] || echo $(($(date +%s) - t0)) >"$work/seconds_$name"
  mem_stop "$name"
}
keep_ckpts() {  # keep_ckpts RUN STEP...: the size of its last checkpoint and the trainable weights of
  [ "$dry" = 0 ] || return 0  # the named steps (for the report), then its checkpoints removed (disk)
  local run=$1 last
  shift
  last=$(find "$work/$run/checkpoints" -maxdepth 1 -name 'step-*' 2>/dev/null | sort -t- -k2 -n | tail -1)
  [ -z "$last" ] || du -sm "$last" | cut -f1 >"$work/ckpt_mb_$run"
  if [ $# -gt 0 ]; then
    "$py" - "$work/$run/checkpoints" "$work/nan_check.json" "$@" <<'PY' || fail "$run: reading its checkpoints"
import json, sys
from pathlib import Path
import torch
from zhllama.pretrain.checkpoint import safe_torch_load
root, out, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
states = []
for step in steps:
    (f,) = sorted((root / f"step-{step}").rglob("*model_states.pt"))
    states.append({k: v.float() for k, v in safe_torch_load(f, map_location="cpu")["module"].items()})
a, b = states
json.dump({"steps": steps, "tensors": len(a), "finite": all(bool(torch.isfinite(t).all()) for s in states for t in s.values()),
           "identical": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}, open(out, "w"))
PY
  fi
  rm -rf "$work/$run/checkpoints"
}
model=(model="$work/model" data="[$work/packed]")

# Stage 1 with its last step NaN (the engine's ZHLLAMA_NAN_STEPS hook): under bf16 the step must be
# skipped, so the checkpoints before and after it hold the same finite weights.
stage_env=(ZHLLAMA_NAN_STEPS=$steps)
stage stage1 pretrain_stage1.sh "${model[@]}" out="$work/stage1" "${common[@]}" save_every=$((steps - 1)) keep_last=2
stage_env=()
keep_ckpts stage1 $((steps - 1)) "$steps"

stage2_args=("${model[@]}" init_adapters="[$work/stage1/final]" "${common[@]}" save_every="$kill_after" keep_last=1)
stage stage2 pretrain_stage2.sh "${stage2_args[@]}" out="$work/stage2"
keep_ckpts stage2

# Stage 2 again: SIGKILLed right after step kill_after+2 (the ZHLLAMA_CRASH hook), then restarted: it
# resumes from checkpoint step-kill_after and must end like the uninterrupted run.
say "stage 2 again, SIGKILLed after step $((kill_after + 2)), then restarted"
if run env ZHLLAMA_CRASH="after-step:$((kill_after + 2))" bash launch/pretrain_stage2.sh "${stage2_args[@]}" \
    out="$work/stage2_resume"; then
  [ "$dry" = 1 ] || fail "stage 2 was not killed"
fi
stage stage2_resume pretrain_stage2.sh "${stage2_args[@]}" out="$work/stage2_resume"
keep_ckpts stage2_resume

# Stage 2 with overlap_comm off, kill_after steps: the same losses within bf16 rounding.
stage stage2_no_overlap pretrain_stage2.sh "${model[@]}" init_adapters="[$work/stage1/final]" "${common[@]}" \
  max_steps="$kill_after" save_every="$kill_after" keep_last=1 ds_config="$work/no_overlap.json" out="$work/stage2_no_overlap"
keep_ckpts stage2_no_overlap

stage sft sft.sh model="$work/model" data="[$sft_data]" out="$work/sft" \
  init_adapters="[$work/stage1/final,$work/stage2/final]" pack_examples=true "${common[@]}" save_every="$steps" keep_last=1
keep_ckpts sft

# ------------------------------------------------------------------------- 5. the table
report=("$py" "$repo/scripts/gpu_check_report.py" "$work" --gpu "$gpu_name" --vocab "$vocab_note"
        --precision "$precision" --install-seconds "$install_s" --seconds "$(($(date +%s) - start))"
        --steps "$steps" --kill-after "$kill_after")
if [ "$dry" = 1 ]; then
  printf '+ '; printf '%q ' "${report[@]}"; echo
else
  "${report[@]}" || fail "the report's checks"
fi

if [ "${#failures[@]}" -gt 0 ]; then
  say "${#failures[@]} failure(s): ${failures[*]}"
  exit 1
fi
if [ "$dry" = 1 ]; then say "dry run: nothing was run"; else say "ok: $work/gpu_check.md"; fi
