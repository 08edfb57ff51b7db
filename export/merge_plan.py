"""Read and check everything a merge needs before anything is written.

`zhllama merge` refuses a bad combination of base, adapters and tokenizer up front (export/merge.py
then only writes): an adapter dir is read from its config and safetensors header (no tensor data),
each key is mapped onto the base tensor it changes, and every adapter is checked against the shapes
the base and the adapters before it leave, so a LoRA for another model size or 49953 vs 49954 rows
is refused with the sizes and the files in the message.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from zhllama.dtypes import short_name
from zhllama.errors import InputError, UserError
from zhllama.log import get_logger
from zhllama.modelio import PADDED_VOCAB_KEY, SP_MODEL_NAME, check_checkpoint, load_tokenizer, read_model_config
from zhllama.pretrain.adapter_files import guess_stage, read_adapter_dir, read_adapter_shapes
from zhllama.pretrain.rope import RopeChange, adapters_change
from zhllama.sft.templates import Template, get_template
from zhllama.st_files import input_shards
from zhllama.st_stream import Reader

log = get_logger("zhllama.merge")


EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PREFIX = "base_model.model."      # PEFT's prefix of every key in adapter_model.safetensors
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


def cached_tokenizer(path):
    """The tokenizer at `path`, loaded once per merge."""
    key = str(Path(path).resolve())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(path)
    return _TOKENIZERS[key]


def drop_tokenizers() -> None:
    """Forget the tokenizers loaded for the checks: a LLaMA tokenizer object is ~70 MB."""
    _TOKENIZERS.clear()


def _tokenizer_len(path) -> int:
    return len(cached_tokenizer(path))


def _check_tokenizer(tok_path, rows: int, padded_to: Optional[int], what: str) -> int:
    n = _tokenizer_len(tok_path)
    if n == rows or (n < rows and padded_to == n):
        return n
    raise UserError(f"vocabulary mismatch: the tokenizer {tok_path} has {n} tokens but {what} has {rows} embedding "
                    "rows; merge adapters with the tokenizer they were trained with (pass --tokenizer)")


def _check_extends(old_path, new_path) -> None:
    """A grown vocabulary must keep the old ids: the old tokenizer's pieces are a prefix of the new one's."""
    old, new = cached_tokenizer(old_path), cached_tokenizer(new_path)
    n = len(old)
    a = old.convert_ids_to_tokens(list(range(n)))
    b = new.convert_ids_to_tokens(list(range(min(n, len(new)))))
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise UserError(f"the tokenizer {new_path} does not extend {old_path}: id {i} is {y!r} there and {x!r} "
                            "in the base; the adapter was trained on another base tokenizer")


def has_tokenizer(d: Path) -> bool:
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


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class MergePlan:
    """What the checks established and the writing phases of `merge_checkpoint` use."""
    base: Path
    cfg: dict                                   # the base's config.json
    shards: List[Path]                          # the base's shards, in index order
    order: List[str]                            # tensor names in file order
    st_dtypes: Dict[str, str]                   # name -> the base's safetensors dtype
    shapes: Dict[str, tuple]                    # name -> output shape (embedding rows grown by the adapters)
    adapters: List[Adapter]
    rows0: int                                  # embedding rows of the base / of the output
    rows: int
    tok_src: Path                               # the tokenizer shipped with the output
    n_tok: int
    dtype_name: str                             # the output's dtype (short name)
    chat: Optional[Template]                    # the SFT template, None for a pretraining-only merge
    chat_source: str
    rope: Optional[RopeChange] = None           # the positions the adapters trained with, when not the base's


def read_base(base: Path):
    """(config, shards, shapes, safetensors dtypes, names in file order) of a LLaMA-style base, whose
    config vocab_size must be its embedding rows."""
    cfg = read_model_config(base)
    if "vocab_size" not in cfg:
        raise UserError(f"{base}/config.json: missing key 'vocab_size'")
    check_checkpoint(base)  # shards that do not hold what config.json describes: one line, before any output
    shards, shapes, st_dtypes, order = base_tensors(base)
    tied = bool(cfg.get("tie_word_embeddings", False))
    if EMBED not in shapes:
        raise UserError(f"{base}: no tensor '{EMBED}' in the checkpoint (not a LLaMA-style model?)")
    if LM_HEAD not in shapes and not tied:
        raise UserError(f"{base}: no tensor '{LM_HEAD}' and tie_word_embeddings is false")
    rows0 = shapes[EMBED][0]
    if int(cfg["vocab_size"]) != rows0:
        raise UserError(f"{base}/config.json says vocab_size {cfg['vocab_size']} but {EMBED} has {rows0} rows")
    return cfg, shards, shapes, st_dtypes, order


def fit_adapters(ads: List[Adapter], base: Path, shapes: Dict[str, tuple], tied: bool, padded_to,
                 tokenizer) -> Tuple[Dict[str, tuple], int, Path]:
    """Check each adapter, in order, against the shapes the base and the adapters before it leave, and
    each tokenizer against the rows it must cover; return (output shapes, rows, tokenizer to ship)."""
    cur_shapes, rows, tok_src = dict(shapes), shapes[EMBED][0], (base if has_tokenizer(base) else None)
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
    return cur_shapes, rows, tok_src


def plan_merge(base: Path, adapters, *, dtype=None, tokenizer=None, template=None,
               ollama_modelfile=None) -> MergePlan:
    """Read the base and every adapter and check that they fit together, writing nothing."""
    cfg, shards, shapes, st_dtypes, order = read_base(base)
    tied = bool(cfg.get("tie_word_embeddings", False))
    ads = [read_adapter(a) for a in adapters]
    _warn_order(ads)
    chat, chat_source = sft_template(ads, template)
    if ollama_modelfile is not None and chat is None:
        raise UserError("--ollama-modelfile needs an SFT template: this merge has no SFT adapter (pass --template)")
    cur_shapes, rows, tok_src = fit_adapters(ads, base, shapes, tied, cfg.get(PADDED_VOCAB_KEY), tokenizer)
    return MergePlan(base=base, cfg=cfg, shards=shards, order=order, st_dtypes=st_dtypes, shapes=cur_shapes,
                     adapters=ads, rows0=shapes[EMBED][0], rows=rows, tok_src=tok_src,
                     n_tok=_tokenizer_len(tok_src), dtype_name=dtype or short_name(st_dtypes[EMBED]),
                     chat=chat, chat_source=chat_source, rope=adapters_change(cfg, [(ad.path, ad.meta) for ad in ads],
                                                                    f"{base}/config.json"))
