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
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from zhllama.dtypes import FLOAT_CODES, SHORT_NAMES, short_name, st_code, torch_dtype, torch_name
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_output_path, sha256_file
from zhllama.hf_tokenizer import TOKENIZER_DIR_FILES, make_portable
from zhllama.log import get_logger
from zhllama.modelio import (PADDED_VOCAB_KEY, SP_MODEL_NAME, load_tokenizer, read_model_config, save_tokenizer,
                             write_resized_configs)
from zhllama.pretrain.adapter_files import guess_stage, read_adapter_dir, read_adapter_shapes
from zhllama.sft.examples import encode_chat_prompt
from zhllama.sft.templates import Template, get_template
from zhllama.st_files import input_shards, parse_size, peak_rss_bytes
from zhllama.st_stream import Reader, ShardWriter, plan_shards

from .model_card import write_model_card
from .ollama import modelfile

log = get_logger("zhllama.merge")

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PREFIX = "base_model.model."      # PEFT's prefix of every key in adapter_model.safetensors
MANIFEST = "SHA256SUMS"
REPORT = "zhllama_merge.json"
# LoRA features zhllama never trains and this merge does not implement; refused rather than merged wrong.
_UNSUPPORTED_LORA = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True, "use_qalora": True}


# ------------------------------------------------------------------------------------------------ adapters

@dataclass
class Adapter:
    """One adapter dir, read and mapped onto base tensor names (no tensor data loaded)."""
    path: Path
    weights: Path
    kind: str                                   # "lora" or "tokens"
    config: dict
    meta: Optional[dict]
    shapes: Dict[str, tuple]                    # adapter key -> shape
    scale: float = 1.0
    lora: Dict[str, Tuple[str, str]] = field(default_factory=dict)   # base name -> (A key, B key)
    replace: Dict[str, str] = field(default_factory=dict)            # base name -> key (modules_to_save)
    tokens: Dict[str, Tuple[str, list]] = field(default_factory=dict)  # base name -> (key, row ids)
    tokenizer_dir: Optional[Path] = None
    rows_in: int = 0                            # embedding rows before / after this adapter
    rows_out: int = 0

    @property
    def stage(self) -> str:
        return (self.meta or {}).get("stage") or guess_stage(self.config)

    def touches(self, name: str) -> bool:
        return name in self.lora or name in self.replace or name in self.tokens


def read_adapter(path) -> Adapter:
    """Read an adapter dir's config and safetensors header and map every key to a base tensor name.

    Missing, empty, truncated or corrupt files are refused by the same checks `load_adapter` runs.
    """

    path = Path(path)
    cfg, weights, meta = read_adapter_dir(path)
    shapes = read_adapter_shapes(weights)
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "TRAINABLE_TOKENS"):
        raise InputError(path / "adapter_config.json", f"peft_type {peft_type!r}: zhllama merges LORA and "
                                                       "TRAINABLE_TOKENS adapters")
    ad = Adapter(path=path, weights=weights, kind="lora" if peft_type == "LORA" else "tokens", config=cfg,
                 meta=meta, shapes=shapes)
    if ad.kind == "lora":
        for key, bad in _UNSUPPORTED_LORA.items():
            if cfg.get(key) == bad:
                raise InputError(path / "adapter_config.json", f"{key}={bad} is not supported by zhllama merge")
        if cfg.get("bias", "none") != "none":
            raise InputError(path / "adapter_config.json", f"bias={cfg['bias']!r} is not supported (only 'none')")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise InputError(path / "adapter_config.json", f"{key} is not supported by zhllama merge")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise InputError(path / "adapter_config.json", f"needs a positive integer 'r' and a number "
                                                           f"'lora_alpha' (got r={r!r}, lora_alpha={alpha!r})")
        ad.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    for key, shape in shapes.items():
        if not key.startswith(PREFIX):
            raise InputError(weights, f"unexpected tensor {key} (PEFT keys start with '{PREFIX}')")
        name = key[len(PREFIX):]
        if ad.kind == "tokens":
            if not name.endswith(".trainable_tokens_delta"):
                raise InputError(weights, f"unexpected tensor {key} in a TrainableTokens adapter")
            idx = cfg.get("token_indices") or []
            if not idx or len(shape) != 2 or shape[0] != len(idx):
                raise InputError(weights, f"{key} has shape {shape} but adapter_config.json lists "
                                          f"{len(idx)} token_indices")
            ad.tokens[name[: -len(".trainable_tokens_delta")] + ".weight"] = (key, [int(i) for i in idx])
        elif ".lora_A." in name or ".lora_B." in name:
            if not name.endswith(".weight"):
                raise InputError(weights, f"unexpected LoRA tensor {key}")
            target = name.split(".lora_")[0] + ".weight"
            a_key = PREFIX + target[: -len(".weight")] + ".lora_A.weight"
            b_key = PREFIX + target[: -len(".weight")] + ".lora_B.weight"
            if a_key not in shapes or b_key not in shapes:
                raise InputError(weights, f"{target}: LoRA needs both {a_key} and {b_key}; one is missing")
            ad.lora[target] = (a_key, b_key)
        elif ".lora_embedding_" in name or ".lora_magnitude" in name:
            raise InputError(weights, f"{key}: LoRA on embeddings / DoRA is not supported by zhllama merge")
        else:
            ad.replace[name] = key      # modules_to_save: base_model.model.<module>.weight
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", SP_MODEL_NAME)):
        ad.tokenizer_dir = path
    return ad


# ------------------------------------------------------------------------------------------------ planning

def base_tensors(base_dir) -> Tuple[List[Path], Dict[str, tuple], Dict[str, str], List[str]]:
    """(shard files, name -> shape, name -> safetensors dtype, names in file order) from the headers only."""


    shards = input_shards(base_dir)
    shapes, dtypes, order = {}, {}, []
    for shard in shards:
        try:
            with Reader(shard) as f:
                for k in f.keys():
                    shapes[k], dtypes[k] = f.shape(k), f.dtype(k)
                    order.append(k)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise InputError(shard, f"unreadable safetensors shard ({e})") from None
    return shards, shapes, dtypes, order


def _hint(ad: Adapter, vocab: bool = False) -> str:
    trained_on = (ad.meta or {}).get("base_model")
    return ("the adapter was trained on another base model" + (f" ({trained_on})" if trained_on else "") +
            "; pass that base" + (", or resize this one to the adapter's tokenizer with `zhllama vocab resize`"
                                  if vocab else ""))


def check_adapter(ad: Adapter, shapes: Dict[str, tuple], rows: int, tied: bool, base_dir) -> int:
    """Check `ad` against the current tensor shapes (base + earlier adapters); return the rows after it."""
    cfg_file = Path(base_dir) / "config.json"
    for target, (a_key, b_key) in sorted(ad.lora.items()):
        if target not in shapes:
            raise UserError(f"{ad.weights}: {a_key} adapts {target}, which the base model {base_dir} does not "
                            f"have; {_hint(ad)}")
        a, b, w = ad.shapes[a_key], ad.shapes[b_key], shapes[target]
        r = ad.config.get("r")
        if len(w) != 2 or len(a) != 2 or len(b) != 2 or a[1] != w[1] or b[0] != w[0] or a[0] != b[1] or a[0] != r:
            raise UserError(f"{ad.weights}: LoRA A {a} and B {b} (r={r}) do not fit {target} of shape {w} in "
                            f"{base_dir}; {_hint(ad)}")
    rows_out = rows
    for target, key in sorted(ad.replace.items()):
        if target not in shapes and not (target == LM_HEAD and tied):
            raise UserError(f"{ad.weights}: {key} replaces {target}, which the base model {base_dir} does not have; "
                            f"{_hint(ad)}")
        got = ad.shapes[key]
        if target == LM_HEAD and tied:
            raise UserError(f"{ad.weights}: the adapter trains lm_head but {cfg_file} ties it to embed_tokens "
                            "(tie_word_embeddings true); zhllama merges untied LLaMA checkpoints")
        want = shapes[target]
        if target in (EMBED, LM_HEAD):
            if len(got) != 2 or got[1] != want[1]:
                raise UserError(f"{ad.weights}: {key} has shape {got} but {target} of {base_dir} is {want}; "
                                f"{_hint(ad)}")
            if got[0] < rows:
                raise UserError(f"vocabulary mismatch: {ad.weights} has {got[0]} rows for {target} but the base "
                                f"{base_dir} (with the adapters before this one) has {rows}; {_hint(ad, vocab=True)}")
            rows_out = max(rows_out, got[0])
        elif got != want:
            raise UserError(f"{ad.weights}: {key} has shape {got} but {target} of {base_dir} is {want}; {_hint(ad)}")
    if rows_out != rows:   # the adapter grows the vocabulary: it must define every row of both matrices
        for target in (EMBED,) + (() if tied else (LM_HEAD,)):
            got = ad.shapes.get(ad.replace.get(target, ""), (None,))[0]
            if got != rows_out:
                raise UserError(
                    f"vocabulary mismatch: {ad.weights} has {rows_out} embedding rows but "
                    f"{'no ' + target if got is None else f'{got} rows for {target}'}, and the base {base_dir} has "
                    f"{rows}; resize the base to the adapter's tokenizer with `zhllama vocab resize` first")
    for target, (key, idx) in sorted(ad.tokens.items()):
        if target == LM_HEAD and tied and target not in shapes and EMBED in ad.tokens:
            continue    # stage 1 on a tied model: PEFT's copy of embed_tokens' rows; the one matrix is merged once
        if target not in shapes:
            raise UserError(f"{ad.weights}: {key} adapts {target}, which the base model {base_dir} does not have; "
                            f"{_hint(ad)}")
        got, want = ad.shapes[key], shapes[target]
        if got[1] != want[1]:
            raise UserError(f"{ad.weights}: {key} has shape {got} but {target} of {base_dir} is {want}; {_hint(ad)}")
        if max(idx) >= rows or min(idx) < 0:
            raise UserError(f"vocabulary mismatch: the stage-1 adapter {ad.path} trains rows up to {max(idx)} but the "
                            f"base {base_dir} has {rows} rows; a stage-1 adapter holds only the rows it trained, so "
                            f"the base must already have the adapter's vocabulary: run `zhllama vocab resize` first")
    trained_rows = (ad.meta or {}).get("vocab_size")
    if trained_rows is not None and int(trained_rows) != rows_out:
        raise UserError(f"vocabulary mismatch: {ad.path / 'zhllama_adapter.json'} says the adapter was trained with "
                        f"{trained_rows} embedding rows, but merging it onto {base_dir} gives {rows_out}")
    return rows_out


_TOKENIZERS: Dict[str, object] = {}      # one merge loads each tokenizer once (cleared per merge)


def _tokenizer(path):
    key = str(Path(path).resolve())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(path)
    return _TOKENIZERS[key]


def _tokenizer_len(path) -> int:
    return len(_tokenizer(path))


def _check_tokenizer(tok_path, rows: int, padded_to: Optional[int], what: str) -> int:
    n = _tokenizer_len(tok_path)
    if n == rows or (n < rows and padded_to == n):
        return n
    raise UserError(f"vocabulary mismatch: the tokenizer {tok_path} has {n} tokens but {what} has {rows} embedding "
                    "rows; merge adapters with the tokenizer they were trained with (pass --tokenizer)")


def _check_extends(old_path, new_path) -> None:
    """A grown vocabulary must keep the old ids: the old tokenizer's pieces are a prefix of the new one's."""
    old, new = _tokenizer(old_path), _tokenizer(new_path)
    n = len(old)
    a = old.convert_ids_to_tokens(list(range(n)))
    b = new.convert_ids_to_tokens(list(range(min(n, len(new)))))
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise UserError(f"the tokenizer {new_path} does not extend {old_path}: id {i} is {y!r} there and {x!r} "
                            "in the base; the adapter was trained on another base tokenizer")


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", SP_MODEL_NAME))


def _warn_order(adapters: List[Adapter]) -> None:
    """An SFT adapter trained on base + stage-2 merged must be merged after that stage-2 adapter."""
    for i, ad in enumerate(adapters):
        run_cfg = (ad.meta or {}).get("run_config")
        if not run_cfg:                 # not a zhllama run (or an older one): nothing recorded to compare
            continue
        before = run_cfg.get("init_adapters") or []
        if len(before) != i:
            log.warning("%s was trained with %d earlier adapter(s) merged in (%s), but %d precede it here; check "
                        "the --adapter order (each adapter belongs after the ones it was trained on)",
                        ad.path, len(before), ", ".join(map(str, before)) or "none", i)


# ------------------------------------------------------------------------------------------------ merging

def _apply(name: str, load, adapters: List[Adapter], handles, out_dtype):
    """The base tensor `load()` with every adapter's change to it applied in order, cast to `out_dtype`.

    Additions happen in float32; a tensor an adapter replaces is not read from the base at all, and is
    not upcast unless a later adapter adds to it, so the embedding matrices cost as little as possible."""
    import torch

    touched = [ad for ad in adapters if ad.touches(name)]
    if not touched:
        tensor = load()
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
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
    return w.to(out_dtype)


def _finite(t, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in pieces: on a whole bf16 embedding it would allocate float32 temporaries."""
    import torch
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(chunk))


def _peak_rss() -> int:
    return peak_rss_bytes()


def sft_template(adapters: List[Adapter], override=None):
    """(Template, where it came from) that the last SFT adapter was trained with, or (None, why not).

    New runs record the whole definition (`template_spec`); older ones only a name or file path."""

    if override is not None:
        return get_template(override), f"--template {override}"
    for ad in reversed(adapters):
        if ad.stage != "sft":
            continue
        run = (ad.meta or {}).get("run_config") or {}
        if run.get("template_spec"):
            return Template.from_dict(run["template_spec"], source=f"{ad.path}/zhllama_adapter.json"), \
                f"recorded in {ad.path}"
        if run.get("template"):
            try:
                return get_template(run["template"]), f"named in {ad.path} ({run['template']})"
            except UserError as e:
                raise UserError(f"{ad.path} was trained with template {run['template']!r}, which cannot be read "
                                f"here ({e}); pass it as --template") from None
        return get_template("alpaca"), f"{ad.path} records no template; zhllama's default (alpaca)"
    return None, "no SFT adapter (a pretraining-only merge: a base model, no chat template)"


def _check_chat_template(out_dir: Path, template) -> None:
    """The tokenizer loaded from `out_dir` renders, with add_generation_prompt, the ids training
    used (`encode_chat_prompt`); raises RuntimeError otherwise."""
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
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
    _TOKENIZERS.clear()
    base, out = Path(base), Path(out)
    check_output_path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output exists; pass --overwrite to replace it")
    if not adapters:
        raise UserError("no --adapter given: nothing to merge")
    if dtype is not None and dtype not in SHORT_NAMES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(SHORT_NAMES)}")
    max_bytes = parse_size(max_shard_size)
    cfg = read_model_config(base)
    if "vocab_size" not in cfg:
        raise UserError(f"{base}/config.json: missing key 'vocab_size'")
    shards, shapes, st_dtypes, order = base_tensors(base)
    tied = bool(cfg.get("tie_word_embeddings", False))
    if EMBED not in shapes:
        raise UserError(f"{base}: no tensor '{EMBED}' in the checkpoint (not a LLaMA-style model?)")
    if LM_HEAD not in shapes and not tied:
        raise UserError(f"{base}: no tensor '{LM_HEAD}' and tie_word_embeddings is false")
    rows0 = shapes[EMBED][0]
    if int(cfg["vocab_size"]) != rows0:
        raise UserError(f"{base}/config.json says vocab_size {cfg['vocab_size']} but {EMBED} has {rows0} rows")
    padded_to = cfg.get(PADDED_VOCAB_KEY)

    # 1. Read and check everything before writing anything.
    ads = [read_adapter(a) for a in adapters]
    _warn_order(ads)
    chat, chat_source = sft_template(ads, template)
    if ollama_modelfile is not None and chat is None:
        raise UserError("--ollama-modelfile needs an SFT template: this merge has no SFT adapter (pass --template)")
    cur_shapes, rows, tok_src = dict(shapes), rows0, (base if _has_tokenizer(base) else None)
    if tok_src is not None:
        _check_tokenizer(tok_src, rows, padded_to, f"the base {base}")
    for ad in ads:
        ad.rows_in = rows
        ad.rows_out = check_adapter(ad, cur_shapes, rows, tied, base)
        if ad.rows_out != rows:
            padded_to = None            # the adapter's matrices define every row
            cur_shapes[EMBED] = (ad.rows_out, cur_shapes[EMBED][1])
            if LM_HEAD in cur_shapes:
                cur_shapes[LM_HEAD] = (ad.rows_out, cur_shapes[LM_HEAD][1])
        if ad.tokenizer_dir is not None:
            _check_tokenizer(ad.tokenizer_dir, ad.rows_out, padded_to, f"the adapter {ad.weights}")
            if ad.rows_out != rows and tok_src is not None:
                _check_extends(tok_src, ad.tokenizer_dir)
            tok_src = ad.tokenizer_dir
        elif ad.rows_out != rows:
            if tokenizer is None:
                raise UserError(f"{ad.path} grows the vocabulary to {ad.rows_out} rows but ships no tokenizer; "
                                "pass the tokenizer it was trained with as --tokenizer")
        rows = ad.rows_out
    if tokenizer is not None:
        tok_src = Path(tokenizer)
        _check_tokenizer(tok_src, rows, padded_to, "the merged model")
    if tok_src is None:
        raise UserError(f"no tokenizer in {base} or in any adapter dir; pass --tokenizer")
    n_tok = _tokenizer_len(tok_src)
    out_dtype_name = dtype or short_name(st_dtypes[EMBED])
    out_dtype = torch_dtype(out_dtype_name)
    log.info("merge %s + %s -> %s (%s, %d -> %d rows, tokenizer %s)", base,
             " + ".join(f"{a.path} [{a.stage}]" for a in ads), out, out_dtype_name, rows0, rows, tok_src)

    # 2. Stream: each base tensor, with every adapter's change, into output shards. The tokenizers loaded
    #    for the checks are dropped first (a LLaMA tokenizer object is ~70 MB).
    _TOKENIZERS.clear()
    gc.collect()
    out_st = st_code(out_dtype_name)
    plan = plan_shards([(n, cur_shapes[n], out_st if st_dtypes[n] in FLOAT_CODES else st_dtypes[n])
                        for n in order], max_bytes)
    handles = {}
    try:
        for ad in ads:
            handles[ad.path] = Reader(ad.weights)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            writer = ShardWriter(tmp, plan)
            for i, shard in enumerate(shards):
                with Reader(shard) as f:
                    for name in f.keys():
                        writer.write(name, _apply(name, lambda: f.get(name), ads, handles, out_dtype))
                log.info("shard %d/%d merged (%s), peak RSS %.2f GB", i + 1, len(shards), shard.name,
                         _peak_rss() / 1e9)
            out_files = writer.finish()

            # 3. Config, generation config, tokenizer.
            new_cfg = _write_configs(base, cfg, tmp, rows, n_tok, out_dtype_name, tok_src)
            _write_tokenizer(tok_src, tmp)
            make_portable(tmp, chat_template=chat.chat_template() if chat is not None else None)
            if chat is not None:
                _check_chat_template(tmp, chat)
                if ollama_modelfile is not None:
                    atomic_write_text(tmp / "Modelfile", modelfile(chat, ollama_modelfile))
            log.info("chat template: %s (%s)", chat.name if chat is not None else "none", chat_source)

            # 4. Check what was written against the base before it becomes `out`.
            verify_output(tmp, cur_shapes, out_dtype_name, rows, base)

            report = {
                "format": "zhllama-merge", "out": str(out), "base": str(base), "base_vocab_size": rows0, "vocab_size": rows,
                "tokenizer": str(tok_src), "tokenizer_size": n_tok, "dtype": out_dtype_name,
                "chat_template": ({"name": chat.name, "response_seam": chat.response_seam, "source": chat_source,
                                   "definition": chat.to_dict()} if chat is not None else None),
                "chat_template_note": chat_source,
                "adapters": [_adapter_record(ad) for ad in ads],
                "shards_in": [s.name for s in shards], "shards_out": out_files,
                "largest_shard_in_bytes": max(s.stat().st_size for s in shards),
                "peak_rss_bytes": _peak_rss(), "seconds": round(time.perf_counter() - t0, 2),
                "config": {k: new_cfg.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers",
                                                       "vocab_size", "max_position_embeddings")},
            }
            atomic_write_json(tmp / REPORT, report)
            write_model_card(tmp, report, ads, base_dir=base, base_tokenizer=base if _has_tokenizer(base) else None)
            write_manifest(tmp)
    finally:
        for h in handles.values():
            h.close()
        _TOKENIZERS.clear()
    log.info("wrote %s: %d shard(s), %d rows, peak RSS %.2f GB, %.1fs", out, len(out_files), rows,
             report["peak_rss_bytes"] / 1e9, time.perf_counter() - t0)
    return report


def _adapter_record(ad: Adapter) -> dict:
    meta = ad.meta or {}
    return {"path": str(ad.path), "stage": ad.stage, "peft_type": ad.config.get("peft_type"),
            "sha256": ((meta.get("files") or {}).get(ad.weights.name) or {}).get("sha256") or sha256_file(ad.weights),
            "rows_in": ad.rows_in, "rows_out": ad.rows_out, "scale": ad.scale if ad.kind == "lora" else None,
            "lora_targets": sorted({n.rsplit(".", 2)[-2] for n in ad.lora}),
            "replaces": sorted(ad.replace), "trained_rows": sum(len(i) for _, i in ad.tokens.values()) or None}


def _write_configs(base: Path, cfg: dict, tmp: Path, rows: int, n_tok: int, dtype_name: str, tok_src) -> dict:
    tok = _tokenizer(tok_src)
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


def verify_output(out_dir: Path, want_shapes: Dict[str, tuple], dtype_name: str, rows: int, base) -> None:
    """Re-open what was written: every base tensor with its (resized) shape and the output dtype, the index,
    config vocab_size == embedding rows, and the tokenizer loadable by AutoTokenizer from `out_dir` alone
    with no more tokens than rows. Raises RuntimeError (a bug, not a user error) on any difference."""
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
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
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
