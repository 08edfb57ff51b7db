"""Merge adapters into a plain Hugging Face checkpoint, shard by shard, and prove the result.

`zhllama merge --base M --adapter A [--adapter A2 ...] --out DIR` folds each adapter into the base,
in the order given (stage 1, stage 2, then SFT: each adapter was trained on the previous ones merged):

  LoRA (stage2, sft)        W += (B @ A) * alpha / r, in float32, then cast to the output dtype
  modules_to_save           the adapter's embed_tokens / lm_head replace the base's
  TrainableTokens (stage1)  the adapter's rows replace those rows of embed_tokens

Every tensor is touched once: it is read from its base shard, every adapter's change to it is applied
in order, and it is streamed into an output shard whose header was planned up front (zhllama/st_stream.py:
no memory-mapping, no shard held in memory). So peak memory is the tensor in hand, in float32 while
LoRA is added, at most an embedding matrix, never a shard or the model (bench/merge_memory.py measures it).

Vocabulary. An adapter whose embed_tokens/lm_head (modules_to_save) have more rows than the base was
trained on a resized base: its matrices define every row, so the merge grows the vocabulary to them.
Its tokenizer must extend the base's (same first ids). A stage-1 adapter only holds some rows, so the
base must already have its size (`zhllama vocab resize`). Any other disagreement between a tokenizer,
an adapter and the base (49953 vs 49954 rows, a LoRA for another model size) is refused before
anything is written, with the sizes and the files in the message.

Output (written to a temp dir, checked, then renamed): safetensors shards + index, config.json with the
real vocab_size, generation_config.json, the tokenizer (tokenizer_config.json loadable by transformers 4.x
and 5.x, and the SFT template as a Jinja chat template: `chat_template.jinja` and `chat_template` in
tokenizer_config.json; none for a pretraining-only merge), README.md (a model card stating base, adapters,
data, hyperparameters and tokenizer figures), zhllama_merge.json (what was merged) and SHA256SUMS
(`sha256sum -c SHA256SUMS` checks every file). Before the rename every tensor name and shape of the
output is compared with the base's, config vocab_size with the embedding rows, and the tokenizer
(loaded with AutoTokenizer from the output alone) with the rows.

example:
  zhllama merge --base models/llama-7b-zh --adapter runs/stage1/final --adapter runs/stage2/final \\
      --adapter runs/sft/final --out merged/chinese-alpaca-7b --dtype fp16
"""

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Dict, List

from zhllama.dtypes import FLOAT_CODES, SHORT_NAMES, st_code, torch_dtype, torch_name
from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_output_path, sha256_file
from zhllama.hf_tokenizer import TOKENIZER_DIR_FILES, make_portable
from zhllama.log import get_logger
from zhllama.model_config import TRUST_REMOTE_CODE
from zhllama.modelio import PADDED_VOCAB_KEY, save_tokenizer, write_resized_configs
from zhllama.pretrain.rope import read_rope, with_rope
from zhllama.outlock import output_lock
from zhllama.sft.examples import encode_chat_prompt
from zhllama.st_files import input_shards, parse_size, peak_rss_bytes
from zhllama.st_stream import Reader, ShardWriter, plan_shards

from .merge_plan import (EMBED, Adapter, MergePlan, cached_tokenizer, drop_tokenizers, has_tokenizer,
                         plan_merge)
from .model_card import write_model_card
from .ollama import modelfile

log = get_logger("zhllama.merge")

MANIFEST = "SHA256SUMS"
REPORT = "zhllama_merge.json"


# ------------------------------------------------------------------------------------------------ merging

def _apply(name: str, load, adapters: List[Adapter], handles, out_dtype):
    """The base tensor `load()` with every adapter's change to it applied in order, cast to `out_dtype`.

    Additions happen in float32; a tensor an adapter replaces is not read from the base at all, and is
    not upcast unless a later adapter adds to it, so the embedding matrices cost as little as possible."""
    import torch

    touched = [ad for ad in adapters if ad.touches(name)]
    if not touched:
        tensor = load()
        return _cast(name, tensor, out_dtype) if tensor.is_floating_point() else tensor
    w = None
    for ad in touched:
        f = handles[ad.path]
        if name in ad.replace:
            w = f.get(ad.replace[name])
        elif name in ad.lora:
            a_key, b_key = ad.lora[name]
            a, b = f.get(a_key).float(), f.get(b_key).float()
            w = (load() if w is None else w).float()
            w += (b @ a) * ad.scale          # PEFT's get_delta_weight, in float32
        else:
            key, idx = ad.tokens[name]
            w = (load() if w is None else w).float()
            w = w.index_copy(0, torch.tensor(idx, dtype=torch.long), f.get(key).float())
        if not _finite(w):
            raise UserError(f"{ad.weights}: merging it into {name} gives NaN or infinite values; the adapter is broken")
    return _cast(name, w, out_dtype)


def _cast(name: str, t, out_dtype):
    """`t` cast to `out_dtype`, refused when a value does not fit: in fp16 (largest finite 65504) a larger
    weight becomes inf, and a checkpoint holding it loads fine and then computes NaN."""
    import torch

    out = t.to(out_dtype)
    if out.dtype != t.dtype and torch.finfo(out.dtype).max < torch.finfo(t.dtype).max and not _finite(out):
        largest = float(t.float().abs().max())
        raise UserError(f"{name} holds values up to {largest:.6g}, beyond the largest finite "
                        f"{str(out_dtype).replace('torch.', '')} ({torch.finfo(out.dtype).max:g}) that --dtype asks "
                        "for; merge with --dtype bf16 (or fp32)")
    return out


def _finite(t, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in pieces: on a whole bf16 embedding it would allocate float32 temporaries."""
    import torch
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(chunk))


def _peak_rss() -> int:
    return peak_rss_bytes()


def _check_chat_template(out_dir: Path, template) -> None:
    """The tokenizer loaded from `out_dir` renders, with add_generation_prompt, the ids training
    used (`encode_chat_prompt`); raises RuntimeError otherwise."""
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True, trust_remote_code=TRUST_REMOTE_CODE)
    msgs = [{"role": "user", "content": "用一句话介绍北京。"}, {"role": "assistant", "content": "北京是中国的首都。"},
            {"role": "user", "content": "Name three colors."}]
    if template.turn is None:
        msgs = msgs[-1:]
    got = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(got, add_special_tokens=False)["input_ids"]
    if ids != encode_chat_prompt(tok, template, msgs):
        raise RuntimeError(f"{out_dir}: the chat template does not reproduce the training prompt ids")


def merge_checkpoint(base, adapters, out, *, dtype=None, max_shard_size="2GB", tokenizer=None,
                     overwrite=False, template=None, ollama_modelfile=None) -> dict:
    """Merge `adapters` (dirs, in order) into the checkpoint `base`, write `out`; returns the report.

    `template`: the SFT template to ship when the adapters record none (default: theirs);
    `ollama_modelfile`: also write an Ollama `Modelfile` whose FROM is this (e.g. ".")."""


    t0 = time.perf_counter()
    drop_tokenizers()
    base, out = Path(base), Path(out)
    max_bytes = _check_arguments(out, adapters, dtype, max_shard_size, overwrite)

    # 1. Read and check everything before writing anything.
    plan = plan_merge(base, adapters, dtype=dtype, tokenizer=tokenizer, template=template,
                      ollama_modelfile=ollama_modelfile)
    log.info("merge %s + %s -> %s (%s, %d -> %d rows, tokenizer %s)", base,
             " + ".join(f"{a.path} [{a.stage}]" for a in plan.adapters), out, plan.dtype_name, plan.rows0,
             plan.rows, plan.tok_src)

    # 2. Stream: each base tensor, with every adapter's change, into output shards. The tokenizers loaded
    #    for the checks are dropped first (a LLaMA tokenizer object is ~70 MB).
    drop_tokenizers()
    gc.collect()
    out_st = st_code(plan.dtype_name)
    shard_plan = plan_shards([(n, plan.shapes[n], out_st if plan.st_dtypes[n] in FLOAT_CODES else plan.st_dtypes[n])
                              for n in plan.order], max_bytes)
    handles = {}
    try:
        for ad in plan.adapters:
            handles[ad.path] = Reader(ad.weights)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            out_files = _merge_shards(plan, handles, shard_plan, tmp)
            # 3. Config, generation config, tokenizer.
            new_cfg = _write_model_files(plan, tmp, ollama_modelfile)
            # 4. Check what was written against the base before it becomes `out`.
            verify_output(tmp, plan.shapes, plan.dtype_name, plan.rows, base,
                          rope=plan.rope.after if plan.rope is not None else None)
            report = _report(plan, out, out_files, new_cfg, t0)
            atomic_write_json(tmp / REPORT, report)
            write_model_card(tmp, report, plan.adapters, base_dir=base,
                             base_tokenizer=base if has_tokenizer(base) else None)
            write_manifest(tmp)
    finally:
        for h in handles.values():
            h.close()
        drop_tokenizers()
    log.info("wrote %s: %d shard(s), %d rows, peak RSS %.2f GB, %.1fs", out, len(out_files), plan.rows,
             report["peak_rss_bytes"] / 1e9, time.perf_counter() - t0)
    return report


def _check_arguments(out: Path, adapters, dtype, max_shard_size, overwrite) -> int:
    """Refuse a bad command line before any file is read; return the shard size in bytes."""
    check_output_path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output exists; pass --overwrite to replace it")
    if not adapters:
        raise UserError("no --adapter given: nothing to merge")
    if dtype is not None and dtype not in SHORT_NAMES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(SHORT_NAMES)}")
    return parse_size(max_shard_size)


def _merge_shards(plan: MergePlan, handles, shard_plan, tmp: Path) -> List[str]:
    """Every base tensor, read once, changed by every adapter in order, streamed into the planned shards;
    returns the output shard names. Peak memory is the tensor in hand, never a shard."""
    out_dtype = torch_dtype(plan.dtype_name)
    writer = ShardWriter(tmp, shard_plan)
    for i, shard in enumerate(plan.shards):
        with Reader(shard) as f:
            for name in f.keys():
                writer.write(name, _apply(name, lambda: f.get(name), plan.adapters, handles, out_dtype))
        log.info("shard %d/%d merged (%s), peak RSS %.2f GB", i + 1, len(plan.shards), shard.name,
                 _peak_rss() / 1e9)
    return writer.finish()


def _write_model_files(plan: MergePlan, tmp: Path, ollama_modelfile) -> dict:
    """config.json and generation_config.json for the merged rows, the tokenizer, the SFT template as the
    chat template (checked to reproduce the training prompt ids) and the Modelfile; returns the config."""
    chat = plan.chat
    cfg = with_rope(plan.cfg, plan.rope.after) if plan.rope is not None else plan.cfg   # a long-context stage
    new_cfg = _write_configs(plan.base, cfg, tmp, plan.rows, plan.n_tok, plan.dtype_name, plan.tok_src)
    _write_tokenizer(plan.tok_src, tmp)
    make_portable(tmp, chat_template=chat.chat_template() if chat is not None else None)
    if chat is not None:
        _check_chat_template(tmp, chat)
        if ollama_modelfile is not None:
            atomic_write_text(tmp / "Modelfile", modelfile(chat, ollama_modelfile))
    log.info("chat template: %s (%s)", chat.name if chat is not None else "none", plan.chat_source)
    return new_cfg


def _report(plan: MergePlan, out: Path, out_files: List[str], new_cfg: dict, t0: float) -> dict:
    """zhllama_merge.json: what was merged into what, so the output can be traced to its inputs."""
    chat, chat_source = plan.chat, plan.chat_source
    return {
        "format": "zhllama-merge", "out": str(out), "base": str(plan.base), "base_vocab_size": plan.rows0,
        "vocab_size": plan.rows, "tokenizer": str(plan.tok_src), "tokenizer_size": plan.n_tok,
        "dtype": plan.dtype_name,
        "chat_template": ({"name": chat.name, "response_seam": chat.response_seam, "source": chat_source,
                           "definition": chat.to_dict()} if chat is not None else None),
        "chat_template_note": chat_source,
        "adapters": [_adapter_record(ad) for ad in plan.adapters],
        "shards_in": [s.name for s in plan.shards], "shards_out": out_files,
        "largest_shard_in_bytes": max(s.stat().st_size for s in plan.shards),
        "peak_rss_bytes": _peak_rss(), "seconds": round(time.perf_counter() - t0, 2),
        "config": {k: new_cfg.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers",
                                               "vocab_size", "max_position_embeddings", "rope_scaling")},
        "rope": plan.rope.record() if plan.rope is not None else None,
    }


def _adapter_record(ad: Adapter) -> dict:
    meta = ad.meta or {}
    return {"path": str(ad.path), "stage": ad.stage, "peft_type": ad.config.get("peft_type"),
            "sha256": ((meta.get("files") or {}).get(ad.weights.name) or {}).get("sha256") or sha256_file(ad.weights),
            "rows_in": ad.rows_in, "rows_out": ad.rows_out, "scale": ad.scale if ad.kind == "lora" else None,
            "lora_targets": sorted({n.rsplit(".", 2)[-2] for n in ad.lora}),
            "replaces": sorted(ad.replace), "trained_rows": sum(len(i) for _, i in ad.tokens.values()) or None}


def _write_configs(base: Path, cfg: dict, tmp: Path, rows: int, n_tok: int, dtype_name: str, tok_src) -> dict:
    tok = cached_tokenizer(tok_src)
    return write_resized_configs(tmp, cfg, base, rows=rows, tokenizer_size=n_tok, tokenizer=tok,
                                 dtype_name=torch_name(dtype_name))


def _write_tokenizer(tok_src: Path, tmp: Path) -> None:
    """Copy the tokenizer files byte for byte (the ids training used); a bare tokenizer.model or an
    early-LLaMA config is converted by modelio instead, so AutoTokenizer can load the output alone."""

    tok_src = Path(tok_src)
    cfg_file = tok_src / "tokenizer_config.json"
    old_class = cfg_file.is_file() and json.loads(cfg_file.read_text(encoding="utf-8")).get(
        "tokenizer_class") == "LLaMATokenizer"
    if tok_src.is_dir() and (tok_src / "tokenizer.json").is_file() and cfg_file.is_file() and not old_class:
        for name in TOKENIZER_DIR_FILES:
            if (tok_src / name).is_file():
                shutil.copyfile(tok_src / name, tmp / name)
    else:
        save_tokenizer(tok_src, tmp)


def verify_output(out_dir: Path, want_shapes: Dict[str, tuple], dtype_name: str, rows: int, base, rope=None) -> None:
    """Re-open what was written: every base tensor with its (resized) shape and the output dtype, the index,
    config vocab_size == embedding rows, the positions `rope` (when given), and the tokenizer loadable by
    AutoTokenizer from `out_dir` alone with no more tokens than rows. Raises RuntimeError (a bug, not a
    user error) on any difference."""
    from safetensors import safe_open
    from transformers import AutoTokenizer


    got, where = {}, {}
    for shard in input_shards(out_dir):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                got[k], where[k] = (tuple(s.get_shape()), s.get_dtype()), shard.name
    missing, extra = sorted(set(want_shapes) - set(got)), sorted(set(got) - set(want_shapes))
    if missing or extra:
        raise RuntimeError(f"{out_dir}: merged checkpoint lacks {missing[:3]} / has extra {extra[:3]} vs {base}")
    st_dtype = st_code(dtype_name)
    for k, (shape, dt) in got.items():
        if shape != tuple(want_shapes[k]):
            raise RuntimeError(f"{out_dir}/{where[k]}: {k} has shape {shape}, expected {tuple(want_shapes[k])}")
        if dt in FLOAT_CODES and dt != st_dtype:
            raise RuntimeError(f"{out_dir}/{where[k]}: {k} is {dt}, expected {st_dtype}")
    cfg = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if cfg["vocab_size"] != rows or got[EMBED][0][0] != rows:
        raise RuntimeError(f"{out_dir}: config vocab_size {cfg['vocab_size']}, {EMBED} rows {got[EMBED][0][0]}, "
                           f"expected {rows}")
    if rope is not None and read_rope(cfg) != rope:
        raise RuntimeError(f"{out_dir}/config.json: positions {read_rope(cfg).describe()}, expected {rope.describe()}")
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True, trust_remote_code=TRUST_REMOTE_CODE)
    n = len(tok)
    if n > rows or (n < rows and cfg.get(PADDED_VOCAB_KEY) != n):
        raise RuntimeError(f"{out_dir}: AutoTokenizer loads {n} tokens for {rows} embedding rows")


def write_manifest(out_dir: Path) -> None:
    """SHA256SUMS in `sha256sum` format over every file of `out_dir` (itself excluded)."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(out_dir.iterdir())
             if p.is_file() and p.name != MANIFEST]
    atomic_write_text(out_dir / MANIFEST, "".join(lines))


def check_manifest(out_dir) -> List[str]:
    """Files of a merged dir whose sha256 differs from SHA256SUMS (empty list: all good)."""
    out_dir = Path(out_dir)
    bad = []
    for line in (out_dir / MANIFEST).read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        p = out_dir / name
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(name)
    return bad


# ------------------------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    parser.add_argument("--base", required=True,
                        help="the checkpoint the first adapter was trained on (HF dir with safetensors), e.g. the "
                             "output of `zhllama vocab resize`, or the original LLaMA when the first adapter "
                             "trains embed_tokens and lm_head in full")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="an adapter dir (a run's final/); repeat in training order: stage1, stage2, sft")
    parser.add_argument("--out", required=True, help="output dir, written atomically (temp dir, then rename)")
    parser.add_argument("--dtype", choices=SHORT_NAMES, default=None,
                        help="dtype of the merged weights (default: the base's). Deltas are computed in fp32")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest output shard file (default 2GB); memory does not depend on it")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship (default: the last adapter's, else the base's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--template", default=None,
                        help="SFT template to ship as the chat template when the SFT adapter records none "
                             "(a built-in name or a .yaml/.json file; default: the one the SFT run recorded)")
    parser.add_argument("--ollama-modelfile", nargs="?", const=".", default=None, metavar="FROM",
                        help="also write an Ollama Modelfile with the SFT template; FROM defaults to '.' "
                             "(this dir), or name a GGUF converted from it (docs/deploy.md)")


def run(args) -> int:
    with output_lock(args.out, "zhllama merge", "checkpoint"):   # one writer per --out, checked writable
        report = merge_checkpoint(args.base, args.adapter, args.out, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                  overwrite=args.overwrite, template=args.template,
                                  ollama_modelfile=args.ollama_modelfile)
    chat = report["chat_template"]
    print("chat template: " + (f"{chat['name']} ({chat['source']}), in chat_template.jinja and tokenizer_config.json"
                               if chat else report["chat_template_note"] + "; none written"))
    print(f"merged {len(report['adapters'])} adapter(s) into {args.out}: {report['vocab_size']:,} rows, "
          f"{report['dtype']}, {len(report['shards_out'])} shard(s), peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB "
          f"(largest base shard {report['largest_shard_in_bytes'] / 1e9:.2f} GB), {report['seconds']}s")
    return 0
