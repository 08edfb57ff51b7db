"""Training throughput: zhllama's DeepSpeed engine vs a plain PyTorch + PEFT loop, same command.

Both train the same tiny LLaMA (stage2 preset: LoRA on q,k,v,o + embed_tokens + lm_head) on the same
packed blocks with the same global batch, micro batch, AdamW, clipping and schedule. The engine runs
as `zhllama train` does (ZeRO-2, world of one, token-weighted loss, metrics); the baseline is the
loop a user would write by hand. Figures: median tokens/s over the timed steps, MFU against this
machine's measured fp32 matmul peak (or the GPU's datasheet peak), and the ratio engine / plain.
The two loops run in one process, one step each in turn (the first of each pair alternating), so both
see the same machine load; the whole is repeated `--repeats` times and the median ratio reported.

  python bench/train.py [--steps 30] [--repeats 3] [--hidden 256] [--layers 4] [--block 128] [--out /tmp/bench_train]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from options import add_model_shape  # bench/ is on sys.path when a bench runs as a script
from zhllama.app.cli import main as zhllama_main
from zhllama.log import setup_logging
from zhllama.modelio import load_tokenizer, read_model_config, save_tokenizer
from zhllama.pretrain.config import load_config
from zhllama.pretrain.engine import Trainer, lr_lambda
from zhllama.pretrain.flops import flops_per_token, peak_flops
from zhllama.pretrain.shards import BlockOrder, PackedBlocks
from zhllama.tiny import make_tiny_llama, make_tiny_sp

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def prepare(out: Path, hidden: int, layers: int, block: int):
    samples = REPO / "zhllama" / "data"
    tok_dir, model_dir, packed = out / "tokenizer", out / "model", out / "packed"
    if not (tok_dir / "tokenizer.json").exists():
        text = (samples / "zh_sample.txt").read_text() + (samples / "en_sample.txt").read_text()
        make_tiny_sp(tok_dir / "tokenizer.model", text=text, vocab_size=3000, seed_lines=1)
        save_tokenizer(load_tokenizer(tok_dir / "tokenizer.model"), tok_dir)
    if not (model_dir / "config.json").exists():
        make_tiny_llama(tok_dir / "tokenizer.model", model_dir, hidden_size=hidden, num_layers=layers,
                        num_heads=max(1, hidden // 64), intermediate_size=int(hidden * 8 / 3) // 16 * 16)
    if not (packed / "manifest.json").exists():
        assert zhllama_main(["data", "pack", "--tokenizer", tok_dir, "--input", samples / "zh_sample.txt",
                             samples / "en_sample.txt", "--block-size", block, "--out", packed, "--workers", "1"]) == 0
    return tok_dir, model_dir, packed


class PlainLoop:
    """The hand-written baseline: PEFT LoRA + AdamW + clipping + LambdaLR, no DeepSpeed; one `step()` a call."""

    def __init__(self, model_dir, packed, *, steps, global_batch, micro, block, lr, seed):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
        self.model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["embed_tokens", "lm_head"]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(steps, 0.05, 0.0))
        self.data = PackedBlocks(packed, "train", expect_block_size=block)
        self.order = BlockOrder(len(self.data), seed)
        self.global_batch, self.micro = global_batch, micro
        self.model.train()

    def step(self, step):
        accum = self.global_batch // self.micro
        for m in range(accum):
            start = step * self.global_batch + m * self.micro
            ids = torch.stack([torch.as_tensor(self.data[self.order.index(p)]) for p in range(start, start + self.micro)])
            loss = self.model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def interleaved_run(model_dir, packed, out, *, steps, global_batch, micro, block, lr, seed):
    """The engine (`Trainer.run`, as `zhllama train` runs it) and the plain loop, one step each in turn,
    in one process: both see the same machine load. The first of the pair alternates every step.
    Returns the step times of each."""
    plain = PlainLoop(model_dir, packed, steps=steps, global_batch=global_batch, micro=micro, block=block, lr=lr,
                      seed=seed)
    times = {"engine": [], "plain": []}

    class Interleaved(Trainer):
        def _train_step(self, step, order, grad_accum):
            result = None

            def engine_step():
                nonlocal result
                result = Trainer._train_step(self, step, order, grad_accum)

            pair = [("plain", lambda: plain.step(step)), ("engine", engine_step)]
            for name, fn in (pair if step % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            return result

    run = out / "engine_run"
    cfg = load_config(None, [
        "stage=stage2", f"model={model_dir}", f"data=[{packed}]", f"out={run}", "init_adapters=[]",
        f"max_steps={steps}", f"global_batch={global_batch}", f"micro_batch={micro}", f"block_size={block}",
        f"lr={lr}", f"seed={seed}", f"save_every={steps}", "keep_last=1", "eval_every=0", "tensorboard=false",
        "resume=false"])
    Interleaved(cfg).run()
    return times["plain"], times["engine"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    add_model_shape(ap, hidden=256, layers=4, seq=128, seq_flag="--block", micro=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the ratio reported is their median")
    ap.add_argument("--out", default="/tmp/zhllama_bench_train")
    args = ap.parse_args()

    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, model_dir, packed = prepare(out, args.hidden, args.layers, args.block)
    kw = dict(steps=args.steps, global_batch=args.global_batch, micro=args.micro, block=args.block, lr=1e-4, seed=0)

    tokens_per_step = args.global_batch * args.block
    cfg = LlamaConfig(**read_model_config(model_dir))
    fpt = flops_per_token(cfg, args.block)
    peak, _ = peak_flops(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    w = args.warmup_steps

    def summary(times):
        med = statistics.median(times[w:])
        tps = tokens_per_step / med
        return {"median_step_s": med, "tokens_per_s": tps, "mfu": fpt * tps / peak}

    runs = []
    for _ in range(args.repeats):
        plain_times, engine_times = interleaved_run(model_dir, packed, out, **kw)
        plain, engine = summary(plain_times), summary(engine_times)
        runs.append({"plain": plain, "engine": engine, "ratio": engine["tokens_per_s"] / plain["tokens_per_s"]})
    ratios = sorted(r["ratio"] for r in runs)
    mid = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    result = {
        "machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "model": f"hidden {args.hidden}, {args.layers} layers, vocab {cfg.vocab_size}",
        "batch": f"global {args.global_batch} x {args.block} tokens, micro {args.micro}",
        "peak_flops": peak, "flops_per_token": fpt, "runs": runs, "ratios": ratios,
        "plain": mid["plain"], "engine": mid["engine"],
        "ratio_engine_over_plain": statistics.median(ratios),
    }
    print(json.dumps(result, indent=2))
    print(f"engine {engine['tokens_per_s']:,.0f} tok/s (MFU {100 * engine['mfu']:.1f}%) vs plain "
          f"{plain['tokens_per_s']:,.0f} tok/s (MFU {100 * plain['mfu']:.1f}%): ratio "
          f"{result['ratio_engine_over_plain']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
