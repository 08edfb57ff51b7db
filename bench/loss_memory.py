"""Peak memory of one training micro-step, measured on CPU, against `zhllama plan`'s prediction.

The model has LLaMA-7B's width (d 4096, MLP 11008, 32 heads) and the merged vocabulary (49,953 rows)
but only `--layers` decoder layers, so the vocabulary-sized terms (the loss, the embed_tokens and
lm_head gradients) weigh as they do at 7B while it fits a small machine. It is built in bf16, staged
as `zhllama train` stages it (`--stage`, default stage2: LoRA + trained embed_tokens and lm_head), and
runs one forward + backward through the engine's loss module (`zhllama.loss.CausalLMTokenLoss`).

Measured: the process's peak resident memory during the micro-step (VmHWM, reset just before through
/proc/self/clear_refs) minus the resident memory before it (weights). Predicted: the plan's
activations (peak) + gradients (1 GPU: every trained parameter's 16-bit gradient) + the transient
gradient of the largest trained matrix (lm_head's, summed over the loss chunks) for the same shape,
from `zhllama.pretrain.plan.plan(..., layers=...)`. Each case runs in a fresh process with glibc's mmap
threshold fixed at 64 KiB, so freed tensors go back to the system and RSS follows live memory.

With --checkpointing the model runs with gradient checkpointing as `zhllama train
gradient_checkpointing=true` enables it, and the prediction is the plan's "with checkpointing" row: the
long-context check (issue 23) runs a narrow model on long sequences, e.g. --hidden 256 --layers 2
--seq 16384 --checkpointing.

  python bench/loss_memory.py [--hidden 4096] [--layers 1] [--seq 1024] [--micro 1] [--stage stage2] [--chunk 0]
                              [--checkpointing]
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from options import add_model_shape  # bench/ is on sys.path when a bench runs as a script
from zhllama.loss import CausalLMTokenLoss, token_loss_sum
from zhllama.pretrain.adapters import apply_stage
from zhllama.pretrain.plan import GIB, loss_bytes, plan
from zhllama.pretrain.presets import STAGES
from zhllama.tiny import llama_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parent.parent
VOCAB = 49953


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def shape_config(hidden: int, layers: int):
    """LLaMA-7B's config with the merged vocabulary, `layers` layers and, if not 4096, another width
    (MLP and heads scaled alike)."""
    config = llama_config("llama-7b", VOCAB)
    config.num_hidden_layers = layers
    if hidden != config.hidden_size:
        config.intermediate_size = config.intermediate_size * hidden // config.hidden_size
        config.num_attention_heads = config.num_key_value_heads = max(1, hidden // 128)
        config.hidden_size = hidden
    return config


def measure(hidden: int, layers: int, seq: int, micro: int, stage: str, chunk: int, checkpointing: bool) -> dict:
    """One micro-step in this process; returns bytes."""
    torch.manual_seed(0)
    config = shape_config(hidden, layers)
    torch.set_default_dtype(torch.bfloat16)
    model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    # LoRA weights in bf16 too, as DeepSpeed's bf16 mode casts the whole module on a GPU (PEFT makes them fp32,
    # and fp32 LoRA layers keep fp32 copies of their inputs)
    model = apply_stage(model, STAGES[stage]).to(torch.bfloat16)
    if checkpointing:   # as the engine does (pretrain/engine.py build_model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lm = CausalLMTokenLoss(model, chunk=chunk or None)
    x = torch.randint(0, VOCAB, (micro, seq))
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    loss = lm(input_ids=x, labels=x)
    loss.backward()
    peak = _status_kib("VmHWM") * 1024
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"measured_bytes": peak - before, "grad_bytes": grads, "loss": float(loss) / (micro * (seq - 1))}


def measure_loss_only(hidden: int, seq: int, chunk: int) -> dict:
    """The token loss alone (bf16 lm_head of width `hidden`, one sequence): peak bytes above the inputs,
    less the lm_head weight's gradient (2 V d, kept after the step)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, VOCAB, bias=False).to(torch.bfloat16)
    h = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, VOCAB, (1, seq))
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    token_loss_sum(head, h, y, VOCAB, chunk or None).backward()
    peak = _status_kib("VmHWM") * 1024 - before
    return {"measured_bytes": peak - 2 * head.weight.numel()}


def predict(hidden: int, layers: int, seq: int, micro: int, stage: str, checkpointing: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        shape_config(hidden, layers).to_json_file(str(Path(d) / "config.json"))
        p = plan(model=d, vocab_size=VOCAB, stage=stage, tokens=1e6, gpus=1, micro_batch=micro,
                 seq_len=seq, global_batch=micro, layers=layers)
    g = p["memory"]["with_checkpointing" if checkpointing else "without_checkpointing"]["gib"]
    return {"predicted_bytes": (g["activations"] + g["gradients"] + g["grad_transient"]) * GIB,
            "activations_bytes": g["activations"] * GIB, "gradient_bytes": g["gradients"] * GIB,
            "grad_transient_bytes": g["grad_transient"] * GIB}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape(ap, hidden=4096, layers=1, seq=1024, micro=1, hidden_help="model width (4096: LLaMA-7B's)")
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--chunk", type=int, default=0, help="loss chunk in positions (0: the engine's default)")
    ap.add_argument("--loss-only", action="store_true",
                    help="measure the token loss alone (one sequence of --seq positions) against plan.loss_bytes")
    ap.add_argument("--checkpointing", action="store_true",
                    help="gradient checkpointing, as zhllama train gradient_checkpointing=true (the plan's row with it)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.loss_only:
            print(json.dumps(measure_loss_only(args.hidden, args.seq, args.chunk)))
        else:
            print(json.dumps(measure(args.hidden, args.layers, args.seq, args.micro, args.stage, args.chunk,
                                     args.checkpointing)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        sys.exit(res.stderr[-3000:])
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    if args.loss_only:
        if args.chunk:
            sys.exit("--loss-only compares the engine's default chunking with the plan; drop --chunk")
        predicted = {"predicted_bytes": loss_bytes(VOCAB, args.seq - 1)["peak"]}
    else:
        predicted = predict(args.hidden, args.layers, args.seq, args.micro, args.stage, args.checkpointing)
    config = shape_config(args.hidden, args.layers)
    shape = (f"loss only, d {args.hidden}, vocab {VOCAB}, {args.seq} tokens" if args.loss_only else
             f"d {config.hidden_size}, MLP {config.intermediate_size}, vocab {VOCAB}, {args.layers} layer(s), "
             f"{args.micro} x {args.seq} tokens, {args.stage}, bf16, loss chunk {args.chunk or 'default'}"
             + (", gradient checkpointing" if args.checkpointing else ""))
    out = {"shape": shape,
           **measured, **predicted, "ratio_predicted_over_measured": predicted["predicted_bytes"] / measured["measured_bytes"]}
    print(json.dumps(out, indent=2))
    print(f"measured {measured['measured_bytes'] / 2**30:.2f} GiB, plan {predicted['predicted_bytes'] / 2**30:.2f} GiB "
          f"(ratio {out['ratio_predicted_over_measured']:.3f})", file=sys.stderr)


if __name__ == "__main__":
    main()
