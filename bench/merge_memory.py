"""Peak memory of `zhllama merge` against the largest shard and the model, and against a naive merge.

Builds a random-weight LLaMA checkpoint of about 1.3 GB (bf16, hidden 2048, 10 layers, 32,000 rows
with LLaMA's tokenizer from ../shared, several shards of at most 300 MB) and a stage-2 style PEFT LoRA
adapter for it (r=8 on q,k,v,o + full embed_tokens and lm_head as modules_to_save, written with PEFT's
own LoraConfig and key names). Then, each in a fresh subprocess whose peak RSS is read from wait4():

  floor   python + torch + transformers + zhllama.export.merge imported, the tokenizer loaded: the
          memory any merge pays before touching a weight
  zhllama `zhllama merge --max-shard-size 300MB` (shard by shard)
  naive   what the anchors' merge scripts do: from_pretrained the whole model, PeftModel.from_pretrained,
          merge_and_unload, save_pretrained (skip with --no-naive)

and prints the ratios: zhllama peak / largest shard, / model size, (peak - floor) / largest shard, and
naive / zhllama. One merged tensor is checked against W + (B @ A) * alpha / r.

usage: python bench/merge_memory.py [--work DIR] [--layers 10] [--hidden 2048] [--shard-mb 300] [--no-naive]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from options import add_model_shape  # bench/ is on sys.path when a bench runs as a script
from zhllama.modelio import load_tokenizer, save_tokenizer
from zhllama.tiny import make_tiny_sp

REPO = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = REPO.parent / "shared" / "data" / "llama" / "tokenizer.model"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_tokenizer(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if SHARED_TOKENIZER.is_file():
        src = SHARED_TOKENIZER
    else:  # no ../shared: a small tokenizer from the bundled samples (the matrices are then smaller)
        print(f"note: {SHARED_TOKENIZER} not found; training a small tokenizer on the bundled samples")
        text = "".join((REPO / "zhllama" / "data" / n).read_text(encoding="utf-8")
                       for n in ("zh_sample.txt", "en_sample.txt"))
        src = make_tiny_sp(out / "sp.model", text=text, vocab_size=8000, seed_lines=1)
    save_tokenizer(load_tokenizer(src), out)
    return len(load_tokenizer(out))


def write_shards(tensors, out: Path, shard_bytes: int, prefix="model"):
    """Write (name, tensor-factory) pairs as HF shards of at most shard_bytes, one shard in memory at a time."""
    from safetensors.torch import save_file

    parts, cur, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal cur, size
        if cur:
            name = f"part-{len(parts)}.safetensors"
            save_file(cur, str(out / name), metadata={"format": "pt"})
            parts.append((name, list(cur)))
            cur, size = {}, 0

    for name, make in tensors:
        t = make()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            flush()
        cur[name], size = t, size + nbytes
    flush()
    total = 0
    for i, (part, names) in enumerate(parts):
        final = f"{prefix}-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(out / part, out / final)
        total += (out / final).stat().st_size
        weight_map.update({n: final for n in names})
    (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def build_base(out: Path, tok_dir: Path, vocab: int, hidden: int, layers: int, shard_bytes: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", "bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def factory(name, shape):
        if name.endswith("norm.weight"):
            return lambda: torch.ones(shape, dtype=torch.bfloat16)
        return lambda: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    write_shards([(k, factory(k, s)) for k, s in shapes.items()], out, shard_bytes)
    cfg.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copyfile(f, out / f.name)
    return shapes


def build_adapter(out: Path, shapes: dict, tok_dir: Path, r=8, alpha=32):
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=list(TARGETS),
               modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM").save_pretrained(str(out))
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes.items():
        mod = name[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] in TARGETS:
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (torch.randn(r, shape[1], generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (torch.randn(shape[0], r, generator=g) * 0.01).to(torch.bfloat16)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[f"base_model.model.{name}"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    for f in tok_dir.iterdir():
        shutil.copyfile(f, out / f.name)


FLOOR = """
import sys
import torch, transformers, safetensors
import zhllama.export.merge
from zhllama.modelio import load_tokenizer
load_tokenizer(sys.argv[1])
"""

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="300MB")
"""


def peak_rss(cmd) -> tuple:
    """(peak RSS in bytes from wait4, seconds) of a subprocess; raises if it fails."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.decode(errors='replace')[-3000:]}")
    kb = usage.ru_maxrss
    return (kb if sys.platform == "darwin" else kb * 1024), time.perf_counter() - t0


def check_one_tensor(base: Path, adapter: Path, merged: Path, name="model.layers.3.self_attn.v_proj.weight"):
    import torch
    from safetensors import safe_open

    def get(d, key):
        idx = d / "model.safetensors.index.json"
        f = json.loads(idx.read_text())["weight_map"][key] if idx.is_file() else "model.safetensors"
        with safe_open(str(d / f), framework="pt") as h:
            return h.get_tensor(key)

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as h:
        mod = "base_model.model." + name[: -len(".weight")]
        a, b = h.get_tensor(mod + ".lora_A.weight").float(), h.get_tensor(mod + ".lora_B.weight").float()
    want = (get(base, name).float() + (b @ a) * (32 / 8)).to(torch.bfloat16)
    assert torch.equal(get(merged, name), want), f"{name} differs from W + (B @ A) * alpha / r"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="working dir (default: a temp dir, removed at the end)")
    add_model_shape(ap, hidden=2048, layers=10)
    ap.add_argument("--shard-mb", type=int, default=300)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive whole-model merge")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        tok = Path(args.work) / "tokenizer"
        shapes = build_base(Path(args.work) / "base", tok, make_tokenizer(tok), args.hidden, args.layers,
                            args.shard_mb * 1000 * 1000)
        build_adapter(Path(args.work) / "adapter", shapes, tok)
        return

    # This process stays small (no torch until the end): Linux records a child's peak RSS including the
    # parent's memory at fork/exec time, so a large parent would inflate every figure below.
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zhllama-merge-bench-"))
    try:
        tok = work / "tokenizer"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", "--work", str(work), "--hidden", str(args.hidden),
                        "--layers", str(args.layers), "--shard-mb", str(args.shard_mb)], check=True)
        vocab = json.loads((work / "base" / "config.json").read_text())["vocab_size"]
        shards = sorted((work / "base").glob("model-*.safetensors"))
        largest = max(s.stat().st_size for s in shards)
        model_bytes = sum(s.stat().st_size for s in shards)
        adapter_bytes = (work / "adapter" / "adapter_model.safetensors").stat().st_size
        print(f"base: {model_bytes / 1e9:.2f} GB bf16 in {len(shards)} shards (largest {largest / 1e6:.0f} MB), "
              f"hidden {args.hidden}, {args.layers} layers, vocab {vocab:,}; adapter {adapter_bytes / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - t0:.0f}s)")

        py = sys.executable
        floor, _ = peak_rss([py, "-c", FLOOR, str(tok)])
        ours, t_ours = peak_rss([py, "-m", "zhllama.app.cli", "merge", "--base", work / "base", "--adapter",
                                 work / "adapter", "--out", work / "merged", "--max-shard-size", f"{args.shard_mb}MB"])
        rows = [("floor (imports + tokenizer)", floor, None), ("zhllama merge", ours, t_ours)]
        naive = None
        if not args.no_naive:
            naive, t_naive = peak_rss([py, "-c", NAIVE, str(work / "base"), str(work / "adapter"), str(work / "naive")])
            rows.append(("naive (from_pretrained + PEFT merge_and_unload)", naive, t_naive))
        check_one_tensor(work / "base", work / "adapter", work / "merged")
        print()
        print(f"{'process':<50} {'peak RSS':>10} {'seconds':>8}")
        for name, rss, sec in rows:
            print(f"{name:<50} {rss / 1e9:>8.2f} GB {'' if sec is None else f'{sec:>8.1f}'}")
        print()
        print(f"zhllama merge peak / largest shard           {ours / largest:6.2f}x")
        print(f"zhllama merge peak / model size              {ours / model_bytes:6.2f}x")
        print(f"(zhllama peak - floor) / largest shard       {(ours - floor) / largest:6.2f}x")
        print(f"(zhllama peak - floor) / model size          {(ours - floor) / model_bytes:6.2f}x")
        if naive is not None:
            print(f"naive peak / zhllama peak                    {naive / ours:6.2f}x")
        print("merged tensor check: W + (B @ A) * alpha / r  ok")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
