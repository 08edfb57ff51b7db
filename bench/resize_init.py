"""Benchmark `zhllama vocab resize`: how good each init is, and how much memory resizing takes.

init (default)
    Trains a small LLaMA briefly on Chinese news with the LLaMA tokenizer (so its embeddings mean
    something), resizes it to a Chinese-extended tokenizer with --init subword-mean, mean and random,
    and prints the held-out loss (nats per token of the new tokenizer, and bits per character) of
    each right after resize, with the ratios against subword-mean. Held-out text is lines of
    news_train.txt that training never reads.

memory
    Writes a checkpoint with LLaMA-7B widths (hidden 4096, intermediate 11008) and --memory-layers
    layers of random fp16 weights in 500 MB shards, then resizes it 32000 -> 55296 twice, each in
    its own process: with zhllama (streaming) and with the plain transformers way
    (from_pretrained + resize_token_embeddings + save_pretrained). Prints both peak RSS and the ratio.

Needs ../shared (the LLaMA and Chinese-LLaMA-2 tokenizers, data/zh/news_train.txt).

  python bench/resize_init.py                 # init comparison, ~3-5 min on 2 cores
  python bench/resize_init.py --mode memory   # peak memory, ~2.5 GB checkpoint
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import need  # bench/ is on sys.path when a bench runs as a script
from zhllama import modelio, tiny
from zhllama.modelio import tokenizer_size
from zhllama.tiny import llama_config
from zhllama.vocab import resize


# --------------------------------------------------------------------------------------------
# init comparison

def _stream(tok, lines):
    """One token stream: BOS + ids of each line, in order (what pretraining packs)."""
    out = []
    for ln in lines:
        out.extend(tok.encode(ln))  # the HF tokenizer adds BOS
    return out


def _eval_loss(model, ids, block):
    """Mean next-token cross-entropy over non-overlapping blocks of the stream, and the nat sum."""
    import torch
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, block):
            x = torch.tensor([ids[s:s + block]])
            if x.shape[1] < 2:
                continue
            logits = model(x).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total += loss.item()
            count += x.shape[1] - 1
    return total / count, total


def bench_init(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base_sp = need("data/llama/tokenizer.model")
    new_tok_path = Path(args.tokenizer) if args.tokenizer else need(
        "data/anchors/chinese_llama2_tokenizer.model")
    lines = need("data/zh/news_train.txt").read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    train_lines = lines[:args.train_lines]
    eval_lines = lines[-args.eval_lines:]  # never trained on
    assert len(lines) > args.train_lines + args.eval_lines

    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-resize-"))
    try:
        t0 = time.perf_counter()
        base_dir = work / "base_tok"
        base_dir.mkdir()
        shutil.copyfile(base_sp, base_dir / "tokenizer.model")
        base_tok = modelio.load_tokenizer(base_dir)
        if args.trained:  # reuse a model this bench trained before (--keep), skip the training
            trained = Path(args.trained)
            model = modelio.load_model(trained, tokenizer_path=base_dir)
            print(f"model: {trained} (trained by an earlier run of this bench)")
        else:
            model_dir = tiny.make_tiny_llama(
                base_dir, work / "init", hidden_size=args.hidden, num_layers=args.layers,
                num_heads=args.heads, intermediate_size=args.hidden * 8 // 3, seed=args.seed)
            model = modelio.load_model(model_dir, tokenizer_path=base_dir)
            n_params = sum(p.numel() for p in model.parameters())
            train_ids = torch.tensor(_stream(base_tok, train_lines))
            print(f"model: hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M params; "
                  f"train stream {len(train_ids):,} LLaMA tokens from {len(train_lines):,} lines")

            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
            g = torch.Generator().manual_seed(args.seed)
            model.train()
            for step in range(args.steps):
                lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=g)
                x = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if step % 50 == 0 or step == args.steps - 1:
                    print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                          flush=True)
            trained = modelio.save_pretrained_atomic(model, base_dir, work / "trained")
            if args.keep:
                shutil.copytree(trained, Path(args.keep) / "trained", dirs_exist_ok=True)

        n_chars = sum(len(ln) for ln in eval_lines)
        base_eval = _stream(base_tok, eval_lines)
        base_loss, base_nats = _eval_loss(model, base_eval, args.eval_block)
        new_tok = modelio.load_tokenizer(new_tok_path)
        new_eval = _stream(new_tok, eval_lines)
        n_new_used = sum(1 for i in new_eval if i >= len(base_tok))
        print(f"held-out: {len(eval_lines)} lines, {n_chars:,} chars; {len(base_eval):,} LLaMA tokens, "
              f"{len(new_eval):,} tokens with {new_tok_path.name} ({n_new_used:,} of them new ids)")
        print(f"before resize (LLaMA tokenizer): {base_loss:.4f} nats/token, "
              f"{base_nats / math.log(2) / n_chars:.3f} bits/char")

        results = {}
        variants = (("subword-mean (default: zero lm_head rows)", {"init": "subword-mean"}),
                    ("subword-mean on both matrices", {"init": "subword-mean", "lm_head_init": "subword-mean"}),
                    ("mean", {"init": "mean"}),
                    ("random", {"init": "random"}))
        for label, kwargs in variants:
            out = work / f"resized-{len(results)}"
            resize.resize_checkpoint(trained, new_tok_path, out, seed=args.seed, **kwargs)
            m = modelio.load_model(out, tokenizer_path=out)
            loss, nats = _eval_loss(m, new_eval, args.eval_block)
            results[label] = {"loss": loss, "bits_per_char": nats / math.log(2) / n_chars}
            del m
        default = variants[0][0]
        ref = results[default]["loss"]
        print("\nheld-out loss right after resize (new tokenizer):")
        print(f"  {'init':<44}{'nats/token':>12}{'bits/char':>11}{'ratio to default':>18}")
        for init, r in results.items():
            print(f"  {init:<44}{r['loss']:>12.4f}{r['bits_per_char']:>11.3f}{r['loss'] / ref:>18.3f}")
        best = min(results, key=lambda k: results[k]["loss"])
        print(f"lowest: {best}; total {time.perf_counter() - t0:.0f}s")
        print(json.dumps({"base_loss": base_loss, "results": results, "steps": args.steps,
                          "hidden": args.hidden, "layers": args.layers}))
        return 0 if best == default else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# peak memory

_BASELINE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16, local_files_only=True)
m.resize_token_embeddings(n, mean_resizing=False)
m.save_pretrained(out)
from zhllama.st_files import peak_rss_bytes  # VmHWM: ru_maxrss would include the parent's
print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
"""


def _write_random_checkpoint(out, layers, shard_bytes, seed):
    """LLaMA-7B-width checkpoint with random fp16 weights, written tensor by tensor in shards."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config("llama-7b")
    cfg.num_hidden_layers = layers
    setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", "float16")
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = [("model.embed_tokens.weight", (v, h))]
    for l in range(layers):
        p = f"model.layers.{l}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    # Random values from a 32M-element pool, tiled with a random offset per tensor: writing
    # gigabytes of fresh randn would dominate the bench, and memory does not depend on the values.
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 25, generator=g) * 0.02).to(torch.float16)

    def rand(shape):
        t = torch.empty(shape, dtype=torch.float16).view(-1)
        off = int(torch.randint(0, pool.numel(), (1,), generator=g))
        src = torch.cat([pool[off:], pool[:off]])
        for s in range(0, t.numel(), src.numel()):
            n = min(src.numel(), t.numel() - s)
            t[s:s + n] = src[:n]
        return t.view(shape)

    shards, cur, cur_bytes, total = [], {}, 0, 0
    for name, shape in shapes:
        t = rand(shape) if len(shape) == 2 else torch.ones(shape, dtype=torch.float16)
        nb = t.numel() * 2
        if cur and cur_bytes + nb > shard_bytes:
            shards.append(cur)
            save_file(cur, str(out / f"s{len(shards)}"), metadata={"format": "pt"})
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += nb
        total += nb
    shards.append(cur)
    save_file(cur, str(out / f"s{len(shards)}"), metadata={"format": "pt"})
    n = len(shards)
    weight_map, largest = {}, 0
    for k, sh in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        (out / f"s{k}").rename(out / name)
        largest = max(largest, (out / name).stat().st_size)
        weight_map.update({t: name for t in sh})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    return total, largest, n


def bench_memory(args):
    base_sp = need("data/llama/tokenizer.model")
    zh = Path(args.tokenizer) if args.tokenizer else need("data/anchors/chinese_llama2_tokenizer.model")
    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-resize-mem-", dir=args.workdir))
    try:
        src = work / "src"
        src.mkdir()
        t0 = time.perf_counter()
        total, largest, n = _write_random_checkpoint(src, args.memory_layers, 500 << 20, args.seed)
        shutil.copyfile(base_sp, src / "tokenizer.model")
        print(f"checkpoint: LLaMA-7B widths, {args.memory_layers} layers, fp16, {total / 1e9:.2f} GB "
              f"in {n} shards (largest {largest / 1e9:.2f} GB), written in {time.perf_counter() - t0:.0f}s")
        new_n = tokenizer_size(zh)
        emb_old, emb_new = 2 * 32000 * 4096 * 2, 2 * new_n * 4096 * 2
        print(f"embed_tokens + lm_head: {emb_old / 1e9:.2f} GB before, {emb_new / 1e9:.2f} GB after "
              f"({new_n} tokens)")

        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        t1 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "vocab", "resize", "--model", str(src),
                            "--tokenizer", str(zh), "--out", str(work / "ours"), "--max-shard-size",
                            "500MB"], capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"zhllama vocab resize failed:\n{r.stderr[-3000:]}")
        ours = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        t_ours = time.perf_counter() - t1
        t1 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _BASELINE, str(src), str(work / "baseline"),
                            str(new_n)], capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"baseline failed:\n{r.stderr[-3000:]}")
        base = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        t_base = time.perf_counter() - t1
        print(f"peak RSS, zhllama vocab resize (streaming): {ours / 1e9:.2f} GB ({t_ours:.0f}s)")
        print(f"peak RSS, from_pretrained + resize_token_embeddings + save_pretrained: "
              f"{base / 1e9:.2f} GB ({t_base:.0f}s)")
        print(f"ratio baseline/zhllama: {base / ours:.2f}x; checkpoint {total / 1e9:.2f} GB; embeddings "
              f"before+after + one 500 MB output shard = {(emb_old + emb_new + (500 << 20)) / 1e9:.2f} GB")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("init", "memory"), default="init")
    p.add_argument("--tokenizer", default=None,
                   help="extended tokenizer (default: ../shared Chinese-LLaMA-2 tokenizer.model); "
                        "e.g. the output dir of `zhllama vocab merge`")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-lines", type=int, default=20000)
    p.add_argument("--eval-lines", type=int, default=300)
    p.add_argument("--eval-block", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-layers", type=int, default=5,
                   help="layers of the memory-bench checkpoint (5 -> ~2.5 GB fp16)")
    p.add_argument("--keep", default=None, help="copy the briefly trained base model here")
    p.add_argument("--trained", default=None,
                   help="skip training: use a model an earlier run saved with --keep (DIR/trained)")
    p.add_argument("--workdir", default=None, help="where the memory bench writes its checkpoints")
    args = p.parse_args(argv)
    return bench_init(args) if args.mode == "init" else bench_memory(args)


if __name__ == "__main__":
    sys.exit(main())
