#!/usr/bin/env bash
# The GPU path end to end, with the project's own commands, on one GPU of 80 GB or more, in about
# 8 minutes: bf16 stage 1, stage 2 (SIGKILLed after a checkpoint, restarted, compared with an
# uninterrupted run) and packed SFT, on a model of LLaMA-7B width (hidden 4096, intermediate 11008,
# 32 heads) with 2 layers and the merged 49,953-piece vocabulary (random weights from a config).
# Prints one table (loss, tokens/s, MFU, peak GPU memory against `zhllama plan`, checkpoint size,
# resume) and exits non-zero on any failure.
#   bash scripts/gpu_check.sh              # WORK=runs/gpu_check, GPU=0 (CUDA_VISIBLE_DEVICES)
#   bash scripts/gpu_check.sh --dry-run    # print every command, run nothing
#   bash scripts/gpu_check.sh --cpu-smoke  # the same steps on CPU ranks with a tiny width (hidden 64)
#                                          # and fp32: checks this script, not the GPU
# Needs the LLaMA tokenizer and the Chinese-LLaMA sentencepiece model from the shared data
# (ZHLLAMA_SHARED, default ../shared): data/llama/tokenizer.model, data/anchors/chinese_llama_sp.model.
# Text: data/zh/news_train.txt there when present, else the bundled zhllama/data samples.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

dry=0 smoke=0
for a in "$@"; do
  case $a in
    --dry-run) dry=1 ;;
    --cpu-smoke) smoke=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (--dry-run, --cpu-smoke, --help)" >&2; exit 2 ;;
  esac
done
# LLaMA-7B width, 2 layers; the smoke run keeps the vocabulary and shrinks the width.
hidden=4096 intermediate=11008 heads=32 layers=2 precision=bf16
if [ "$smoke" = 1 ]; then
  hidden=64 intermediate=176 heads=4 precision=fp32
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi

work=${WORK:-runs/gpu_check}
shared=${ZHLLAMA_SHARED:-$repo/../shared}
gpu=${GPU:-0}
py=${PYTHON:-python}
steps=20 kill_after=10 micro=8 global=32 block=512
[ "$smoke" = 0 ] || { steps=6 kill_after=2 micro=2 global=4 block=64; }
steps=${STEPS:-$steps}              # optimizer steps per stage
kill_after=${KILL_AFTER:-$kill_after} # checkpoint interval; stage 2 is SIGKILLed 2 steps after it
micro=${MICRO_BATCH:-$micro}
global=${GLOBAL_BATCH:-$global}
export GPUS_PER_NODE=1 LOG_DIR=$work/logs PYTHON=$py
if [ "$smoke" = 0 ]; then export CUDA_VISIBLE_DEVICES=$gpu; else unset CUDA_VISIBLE_DEVICES; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
common=("max_steps=$steps" "global_batch=$global" "micro_batch=$micro" "precision=$precision" "save_every=$kill_after"
        "block_size=$block" "keep_last=2" "eval_every=0" "tensorboard=false" "log_every=5")
failures=()

say() { echo "gpu_check: $*"; }
fail() { failures+=("$1"); say "FAILED: $1"; }
# run CMD...: print it; run it unless --dry-run.
run() {
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

# ---------------------------------------------------------------------------------------- 0. inputs
llama_sp=$shared/data/llama/tokenizer.model
zh_sp=$shared/data/anchors/chinese_llama_sp.model
text=$shared/data/zh/news_train.txt
[ -f "$text" ] || text=$repo/zhllama/data/zh_sample.txt
sft_data=$repo/zhllama/data/sft_zh.jsonl
for f in "$llama_sp" "$zh_sp"; do
  [ "$dry" = 1 ] || [ -f "$f" ] || { echo "gpu_check.sh: $f not found (set ZHLLAMA_SHARED to the shared data folder)" >&2; exit 2; }
done
[ "$dry" = 1 ] || { rm -rf "$work"; mkdir -p "$work/logs"; }
if [ "$dry" = 1 ]; then
  gpu_name="NVIDIA A100-SXM4-80GB (dry run)"
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
  *A800*) plan_gpu=a800 ;; *A100*80*) plan_gpu=a100-80g ;; *) plan_gpu=a100-80g ;;
esac
say "$gpu_name (plan as $plan_gpu), work dir $work"
start=$(date +%s)

# ---------------------------------------------------------------------------------------- 1. data
run zhllama vocab merge --base "$llama_sp" --add "$zh_sp" --compat v1 --out "$work/tokenizer"
run "$py" -c "
import sys
import torch
from transformers import LlamaForCausalLM
from zhllama.modelio import load_tokenizer, save_tokenizer
from zhllama.tiny import tiny_llama_config
cfg = tiny_llama_config(32000, hidden_size=$hidden, intermediate_size=$intermediate, num_heads=$heads,
                        num_layers=$layers, max_position_embeddings=$block)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16 if '$precision' == 'bf16' else torch.float32).save_pretrained(sys.argv[1])
save_tokenizer(load_tokenizer(sys.argv[2]), sys.argv[1])
" "$work/base" "$llama_sp"
run zhllama vocab resize --model "$work/base" --tokenizer "$work/tokenizer" --out "$work/model"
run zhllama data pack --tokenizer "$work/tokenizer" --input "$text" --block-size "$block" --out "$work/packed" \
  --workers 4 --validation-ratio 0.01

# ---------------------------------------------------------------------------------------- 2. plan
plan() {  # plan STAGE CHECKPOINTING -> GiB per GPU the planner expects
  local key=without_checkpointing
  [ "$2" = true ] && key=with_checkpointing
  printf '+ '; printf '%q ' zhllama plan --model "$work/model" --stage "$1" --tokens 1e6 --gpus 1 --gpu "$plan_gpu" \
    --micro-batch "$micro" --seq-len "$block" --global-batch "$global" --json; echo
  [ "$dry" = 1 ] && return 0
  # The GPU's memory figure applies to the smoke run too: the plan is for the real GPU.
  zhllama plan --model "$work/model" --stage "$1" --tokens 1e6 --gpus 1 --gpu "$plan_gpu" --micro-batch "$micro" \
    --seq-len "$block" --global-batch "$global" --json >"$work/plan_$1.json" || { fail "plan $1"; return 0; }
  "$py" -c "import json,sys; print('%.1f' % json.load(open(sys.argv[1]))['memory'][sys.argv[2]]['total_gib'])" \
    "$work/plan_$1.json" "$key" >"$work/plan_$1.gib"
}
plan stage1 false
plan stage2 true
plan sft true

# ---------------------------------------------------------------------------------------- 3. train
stage() {  # stage NAME LAUNCHER key=value...: one run, with its GPU memory sampled
  local name=$1 script=$2
  shift 2
  mem_start "$name"
  run bash "launch/$script" "$@" || fail "$name exited non-zero"
  mem_stop "$name"
}
model=(model="$work/model" data="[$work/packed]")
stage stage1 pretrain_stage1.sh "${model[@]}" out="$work/stage1" "${common[@]}"
stage stage2 pretrain_stage2.sh "${model[@]}" out="$work/stage2" init_adapters="[$work/stage1/final]" "${common[@]}"

# Stage 2 again: the training process is SIGKILLed right after step kill_after+2 (the engine's
# ZHLLAMA_CRASH hook: an exact moment, however fast the steps), then restarted: it must resume from
# checkpoint step-$kill_after and end like the uninterrupted run above.
resume_args=("${model[@]}" out="$work/stage2_resume" init_adapters="[$work/stage1/final]" "${common[@]}")
say "stage 2 again, SIGKILLed after step $((kill_after + 2)), then restarted"
if run env ZHLLAMA_CRASH="after-step:$((kill_after + 2))" bash launch/pretrain_stage2.sh "${resume_args[@]}"; then
  [ "$dry" = 1 ] || fail "stage 2 was not killed"
fi
stage stage2_resume pretrain_stage2.sh "${resume_args[@]}"

stage sft sft.sh model="$work/model" data="[$sft_data]" out="$work/sft" \
  init_adapters="[$work/stage1/final,$work/stage2/final]" pack_examples=true "${common[@]}"

# ---------------------------------------------------------------------------------------- 4. table
report=("$py" - "$work" "$((($(date +%s) - start)))")
printf '+ '; printf '%q ' "${report[@]}"; echo "<<'PY' (the table)"
if [ "$dry" = 0 ]; then
  "${report[@]}" <<'PY' || fail "table"
import json, subprocess, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

work, seconds = Path(sys.argv[1]), int(sys.argv[2])
bad = []

def metrics(run):
    f = work / run / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []

def peak_gib(run):
    f = work / f"mem_{run}.csv"
    vals = [int(v) for v in f.read_text().split()] if f.exists() else []
    return max(vals) / 1024 if vals else float("nan")

def plan_gib(stage):
    f = work / f"plan_{stage}.gib"
    return float(f.read_text()) if f.exists() else float("nan")

def ckpt_mb(run):
    ckpts = sorted((work / run / "checkpoints").glob("step-*"))
    if not ckpts:
        return float("nan")
    out = subprocess.run(["du", "-sm", str(ckpts[-1])], capture_output=True, text=True).stdout
    return float(out.split()[0])

print(f"\n{'stage':<15}{'steps':>6}{'loss first→last':>20}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}"
      f"{'ckpt MB':>9}")
for run, stage in (("stage1", "stage1"), ("stage2", "stage2"), ("stage2_resume", "stage2"), ("sft", "sft")):
    m = metrics(run)
    if not m or not (work / run / "final" / "adapter_model.safetensors").exists():
        bad.append(f"{run}: no metrics or no final adapter")
        print(f"{run:<15}   (failed)")
        continue
    tail = m[len(m) // 2:]  # steady state: the second half
    tps = sum(r["tokens_per_s"] for r in tail) / len(tail)
    mfu = sum(r["mfu"] for r in tail) / len(tail)
    peak, planned = peak_gib(run), plan_gib(stage)
    def num(x, fmt):
        return format(x, fmt) if x == x else "n/a"
    print(f"{run:<15}{m[-1]['step']:>6}{m[0]['loss']:>10.3f} → {m[-1]['loss']:<7.3f}{tps:>10,.0f}{100 * mfu:>6.1f}%"
          f"{num(peak, '.1f'):>10}{num(planned, '.1f'):>10}{num(ckpt_mb(run), ',.0f'):>9}")
    if not all(r["loss"] is not None for r in m):
        bad.append(f"{run}: non-finite loss")
    if peak == peak and planned == planned and peak > 1.25 * planned:
        bad.append(f"{run}: peak GPU memory {peak:.1f} GiB is over 1.25 x the plan's {planned:.1f} GiB")

a, b = metrics("stage2"), metrics("stage2_resume")
if a and b:
    ref = {r["step"]: r["loss"] for r in a}
    got = {r["step"]: r["loss"] for r in b}  # the resumed run's records overwrite the killed run's
    rel = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref if s in got)
    wa = load_file(str(work / "stage2" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(work / "stage2_resume" / "final" / "adapter_model.safetensors"))
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    resumed = f"resumed from {work / 'stage2_resume' / 'checkpoints'}" in (work / "logs" / "pretrain_stage2_node0.log").read_text()
    print(f"\nSIGKILL + restart of stage 2: resumed {'yes' if resumed else 'NO'}, steps {sorted(got) == sorted(ref)}, "
          f"max relative loss difference {rel:.2e}, max adapter difference {diff:.2e} (0 = bit-exact)")
    if not resumed or sorted(got) != sorted(ref) or rel > 1e-3:
        bad.append("stage 2 did not resume exactly")
print(f"\n{seconds} s in all")
for b_ in bad:
    print("FAILED:", b_)
sys.exit(1 if bad else 0)
PY
fi

if [ "${#failures[@]}" -gt 0 ]; then
  say "${#failures[@]} failure(s): ${failures[*]}"
  exit 1
fi
if [ "$dry" = 1 ]; then say "dry run: nothing was run"; else say "ok"; fi
