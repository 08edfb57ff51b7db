"""Resize a checkpoint's embed_tokens and lm_head to a merged tokenizer, shard by shard.

Rows 0..N-1 (the base vocabulary) are copied bit for bit, so the model computes exactly what it did
on base-vocabulary input. The new rows are initialised by one of:

  subword-mean (default)  each new token's row is the mean of the rows of the pieces the base
                          tokenizer splits its text into (byte-fallback pieces included): the new
                          token starts where the model already "reads" that text
  mean                    every new row is the mean of the old rows (Stanford Alpaca)
  random                  N(0, initializer_range), as a freshly constructed model would have

`--init` sets embed_tokens; `--lm-head-init` sets the new lm_head rows. Its default follows --init,
except that with subword-mean the new lm_head rows start at zero. Why: an output row that is the mean
of its pieces' rows gives the new token the *average* of its pieces' logits at a position where only
the first piece is due, so a word's later characters pull its logit far down (and a frequent first
character pushes every word starting with it up). Measured by bench/resize_init.py (docs/resize.md):
held-out loss right after resize 8.30 nats/token with subword-mean input + zero output rows, 9.08
with subword-mean on both, 8.41 random, 10.22 mean. Zero rows give every new token one neutral
logit, which training moves quickly; `--lm-head-init subword-mean` keeps the pure variant.

Tied embeddings (LLaMA-3.2 1B/3B, SmolLM2: `tie_word_embeddings`): there is one matrix, so one
rule: the shared new row is the --init row (default subword-mean). Zero rows, the untied default
for the output side, would leave the new tokens with no input embedding at all; subword-mean gives
the input side its meaning and costs the output side what subword-mean costs an untied lm_head
(docs/resize.md). The output keeps `tie_word_embeddings` and is saved without an lm_head tensor
(one that a checkpoint stores anyway is dropped: it is the same matrix).

Byte-level BPE bases (tokenizer.json, no tokenizer.model): subword-mean splits each new token's
byte string with the base BPE model (`bpe_subword_sources`).

--pad-to-multiple-of 64 adds rows up to a multiple of 64 (tensor-core friendly matmuls). The
tokenizer never produces those ids; the config records the real size under
"zhllama_tokenizer_vocab_size" so every zhllama stage knows which rows are padding.

Memory: tensors are streamed from the input safetensors one at a time straight into output shards
of at most --max-shard-size planned from the input headers (zhllama/st_stream.py, as `zhllama merge`
does), so peak memory is the two embedding matrices (old and new), not a shard or the whole model.
The output is a complete HF checkpoint (safetensors, config with the new vocab_size, generation
config, tokenizer) that AutoModelForCausalLM loads.

Example:
  zhllama vocab resize --model llama-7b-hf --tokenizer merged_tokenizer --out llama-7b-zh \\
      --init subword-mean --pad-to-multiple-of 64
"""

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zhllama import bpe
from zhllama.argtypes import SEED, int_range
from zhllama.bpe import is_bpe_json_base
from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, atomic_write_json
from zhllama.hf_tokenizer import HF_TOKENIZER_FILES
from zhllama.log import get_logger
from zhllama.outlock import output_lock
from zhllama.modelio import (PADDED_VOCAB_KEY, check_checkpoint, load_tokenizer, read_model_config,
                             save_tokenizer, write_resized_configs)
from zhllama.spm import find_sp_model
from zhllama.st_files import input_shards, parse_size, peak_rss_bytes
from zhllama.st_stream import Reader, ShardWriter, plan_shards

log = get_logger(__name__)

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INITS = ("subword-mean", "mean", "random")
LM_HEAD_INITS = INITS + ("zero",)
REPORT_NAME = "resize_report.json"


# ---------------------------------------------------------------------------------------------
# Tokenizers: what the new ids are, and which base pieces each new token's text splits into.

def token_strings(tokenizer_path):
    """(tokens, no_text_ids, tokenizer): the string of every id, and ids that have no text.

    SentencePiece pieces are taken from the `tokenizer.model` when there is one (the ground truth
    for ids below its size); ids added on top by HF (`added_tokens`) come from the HF tokenizer.
    Control/unknown pieces and HF special tokens have no text to split, so they get the mean row.
    """
    import sentencepiece as spm

    tok = load_tokenizer(tokenizer_path)
    n = len(tok)
    sp_file = find_sp_model(tokenizer_path)
    no_text = set(int(i) for i in tok.all_special_ids)
    if sp_file is None:
        return list(tok.convert_ids_to_tokens(list(range(n)))), no_text, tok
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    m = sp.get_piece_size()
    if m > n:
        raise UserError(f"{tokenizer_path}: {sp_file.name} has {m} pieces but the HF tokenizer only "
                        f"{n}; the tokenizer files disagree")
    tokens = [sp.id_to_piece(i) for i in range(m)]
    tokens += list(tok.convert_ids_to_tokens(list(range(m, n))))
    no_text |= {i for i in range(m) if sp.is_control(i) or sp.is_unknown(i)}
    return tokens, no_text, tok


def _sp_without_dummy_prefix(sp_file):
    """The base SentencePiece model, set to encode a string exactly as written.

    With add_dummy_prefix the model would turn "中国" into "▁中国", so a mid-word piece would be
    averaged with the word-start "▁" pieces, and "▁中国" (" 中国") would get two "▁". Turning it off
    (and keeping spaces) makes the encoding of a piece's text the base's split of that very piece.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(sp_file).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def subword_sources(base_sp_file, new_tokens, no_text_ids, first_id):
    """For each new token, the base ids its text encodes to (no BOS), or None (-> mean row)."""
    sp = _sp_without_dummy_prefix(base_sp_file)
    byte_re = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    out = []
    for i, piece in enumerate(new_tokens, start=first_id):
        if i in no_text_ids or byte_re.match(piece):
            out.append(None)
            continue
        ids = sp.encode(piece.replace("\u2581", " "))
        out.append(list(ids) or None)
    return out


def bpe_subword_sources(base_tokenizer_json, new_tokens, no_text_ids, first_id):
    """subword_sources for a byte-level BPE base (tokenizer.json): the base model's split of each new
    token's byte string, as one pre-token (so the split is of exactly that token, like the
    SentencePiece case without the dummy prefix). Tokens that are not byte strings get None (mean)."""
    model = bpe.load_tokenizer(base_tokenizer_json).model
    out = []
    for i, tok in enumerate(new_tokens, start=first_id):
        if i in no_text_ids or bpe.token_bytes(tok) is None:
            out.append(None)
            continue
        out.append([t.id for t in model.tokenize(tok)] or None)
    return out


def check_extends(base_tokens, new_tokens, base_path, new_path):
    """The new tokenizer must keep every base id with its piece, and not be smaller."""
    nb, nn = len(base_tokens), len(new_tokens)
    if nn < nb:
        raise UserError(f"{new_path} has {nn} tokens, fewer than the model's {nb} ({base_path}); "
                        f"resize only grows the vocabulary")
    for i, (a, b) in enumerate(zip(base_tokens, new_tokens)):
        if a != b:
            raise UserError(
                f"{new_path} does not extend the model's tokenizer {base_path}: id {i} is {b!r} "
                f"there but {a!r} in the base; the first {nb} pieces must be the base's (build the "
                f"tokenizer with `zhllama vocab merge --base {base_path}`)")


# ---------------------------------------------------------------------------------------------
# Matrices.

def build_matrix(old, old_size, rows, sources, init, seed=0, std=0.02):
    """The resized matrix: old rows copied, new rows initialised, padding rows set to the mean.

    New rows are computed in float32 and cast to the matrix's dtype; old rows are copied unchanged.
    """
    import torch

    n_new, dim = len(sources), old.shape[1]
    assert old_size + n_new <= rows
    if init not in LM_HEAD_INITS:
        raise UserError(f"unknown init '{init}'; choose one of {', '.join(LM_HEAD_INITS)}")
    # Memory: no float32 copy of the whole matrix (for 7B that would be 0.5 GB per matrix); the
    # mean is accumulated in float32 and new rows are written in place, a chunk at a time.
    new = torch.empty(rows, dim, dtype=old.dtype)
    new[:old_size] = old[:old_size]
    mean = torch.sum(old[:old_size], 0, dtype=torch.float32) / old_size
    chunk = 4096
    if init == "subword-mean":
        for j, ids in enumerate(sources):
            # index_select, not old[ids]: advanced indexing of a large matrix costs milliseconds
            # per call, which is minutes over 20k new tokens.
            row = old.index_select(0, torch.tensor(ids)).float().mean(0) if ids else mean
            new[old_size + j].copy_(row)
    elif init == "mean":
        new[old_size:old_size + n_new] = mean.to(old.dtype)
    elif init == "zero":
        new[old_size:old_size + n_new] = 0
    else:  # random
        g = torch.Generator().manual_seed(seed)
        for s in range(0, n_new, chunk):
            n = min(chunk, n_new - s)
            new[old_size + s:old_size + s + n] = (torch.randn(n, dim, generator=g) * std).to(old.dtype)
    # Padding rows: never produced by the tokenizer; the mean row keeps their logits ordinary.
    new[old_size + n_new:] = mean.to(old.dtype)
    return new


# ---------------------------------------------------------------------------------------------
# Checkpoint streaming.

def output_tensors(shards, tied, old_rows, rows):
    """(shard, name, output shape, dtype) of every tensor the resized checkpoint holds, in the order it is
    written: input shards in index order, names sorted within a shard. Read from the headers only, so the
    output shards are planned (and a misshapen embedding refused) before anything is written."""
    out = []
    for shard in shards:
        with Reader(shard) as r:
            for name in sorted(r.entries):
                if tied and name == LM_HEAD:
                    continue  # one shared matrix: a tied checkpoint is saved without lm_head
                shape = r.shape(name)
                if name in (EMBED, LM_HEAD):
                    if shape[0] != old_rows:
                        raise UserError(f"{shard}: {name} has {shape[0]} rows but config.json "
                                        f"says vocab_size {old_rows}")
                    shape = (rows,) + tuple(shape[1:])
                out.append((shard, name, shape, r.dtype(name)))
    return out


def default_lm_head_init(init: str) -> str:
    """subword-mean input rows go with zero output rows (see the module docstring); else the same."""
    return "zero" if init == "subword-mean" else init


@dataclass
class ResizePlan:
    """What `plan_resize` read and checked, and the writing phases of `resize_checkpoint` use."""
    model_dir: Path
    tokenizer_path: object                      # the merged tokenizer, as given
    cfg: dict                                   # the model's config.json
    shards: list                                # the model's shards, in index order
    tied: bool
    max_bytes: int                              # the largest output shard
    old_rows: int                               # embedding rows of the model (padding included)
    old_size: int                               # its real vocabulary: rows that are copied
    new_size: int                               # the merged tokenizer's size
    rows: int                                   # output rows (new_size, padded)
    new_tok: object                             # the merged tokenizer, loaded
    init: str
    lm_head_init: str
    sources: list                               # per new token: base ids to average, or None (mean)
    n_split: int                                # new tokens with base pieces (subword-mean)
    std: float                                  # the config's initializer_range, for --init random


def resize_checkpoint(model_dir, tokenizer_path, out_dir, init="subword-mean",
                      pad_to_multiple_of=None, base_tokenizer=None, seed=0,
                      max_shard_size="2GB", overwrite=False, lm_head_init=None) -> dict:
    """Write `out_dir`: the checkpoint at `model_dir` with its vocabulary grown to `tokenizer_path`.

    `init` initialises the new embed_tokens rows, `lm_head_init` (default: `default_lm_head_init`)
    the new lm_head rows. Returns the report also written to `out_dir/resize_report.json`.
    """
    t0 = time.perf_counter()
    if init not in INITS:
        raise UserError(f"unknown --init '{init}'; choose one of {', '.join(INITS)}")
    lm_head_init = lm_head_init or default_lm_head_init(init)
    if lm_head_init not in LM_HEAD_INITS:
        raise UserError(f"unknown --lm-head-init '{lm_head_init}'; choose one of {', '.join(LM_HEAD_INITS)}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise UserError(f"--pad-to-multiple-of must be a positive integer, got {pad_to_multiple_of}")
    model_dir = Path(model_dir)
    plan = plan_resize(model_dir, tokenizer_path, Path(base_tokenizer) if base_tokenizer else model_dir,
                       init, lm_head_init, pad_to_multiple_of, max_shard_size)

    tensors = output_tensors(plan.shards, plan.tied, plan.old_rows, plan.rows)
    names = {name for _, name, _, _ in tensors}
    if EMBED not in names:
        raise UserError(f"{model_dir}: no tensor '{EMBED}' in the checkpoint (not a LLaMA model?)")
    if LM_HEAD not in names and not plan.tied:
        raise UserError(f"{model_dir}: no tensor '{LM_HEAD}' and tie_word_embeddings is false")
    shard_plan = plan_shards([(name, shape, dt) for _, name, shape, dt in tensors], plan.max_bytes)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        out_files = _write_shards(plan, tensors, shard_plan, tmp, seed)
        _write_tokenizer_and_configs(plan, tmp)
        report = _report(plan, seed, out_files, t0)
        atomic_write_json(tmp / REPORT_NAME, report)
    log.info("wrote %s (%d shards, peak RSS %.2f GB, %.1fs)", out_dir, len(out_files),
             report["peak_rss_bytes"] / 1e9, report["seconds"])
    return report


def plan_resize(model_dir: Path, tokenizer_path, base_tok_path: Path, init: str, lm_head_init: str,
                pad_to_multiple_of, max_shard_size) -> ResizePlan:
    """Check the checkpoint and that the merged tokenizer extends the model's, size the output, and find,
    for subword-mean, the base pieces of every new token; nothing is written yet."""
    cfg = read_model_config(model_dir)
    check_checkpoint(model_dir)  # a corrupt or misshapen shard: one line naming it, before any output
    if "vocab_size" not in cfg:
        raise UserError(f"{model_dir}/config.json: missing key 'vocab_size'")
    old_rows = int(cfg["vocab_size"])
    old_size = int(cfg.get(PADDED_VOCAB_KEY, old_rows))  # a padded base: its real vocabulary
    tied = bool(cfg.get("tie_word_embeddings", False))
    shards = input_shards(model_dir)
    max_bytes = parse_size(max_shard_size)

    if base_tok_path == model_dir and not any((model_dir / f).is_file() for f in HF_TOKENIZER_FILES):
        raise UserError(f"{model_dir} holds no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model); "
                        "pass the one the model was trained with as --base-tokenizer")
    base_tokens, _, _ = token_strings(base_tok_path)
    if len(base_tokens) != old_size:
        raise UserError(f"the model {model_dir} has {old_size} vocabulary rows but its tokenizer "
                        f"{base_tok_path} has {len(base_tokens)} tokens; pass the tokenizer the "
                        f"model was trained with as --base-tokenizer")
    new_tokens, no_text, new_tok = token_strings(tokenizer_path)
    check_extends(base_tokens, new_tokens, base_tok_path, tokenizer_path)
    new_size = len(new_tokens)
    rows = new_size
    if pad_to_multiple_of:
        rows = math.ceil(new_size / pad_to_multiple_of) * pad_to_multiple_of

    added = new_tokens[old_size:]
    if tied and lm_head_init != init:
        log.info("tied embeddings: lm_head is embed_tokens, so --lm-head-init %s does not apply", lm_head_init)
        lm_head_init = init
    sources = _new_row_sources(base_tok_path, added, no_text, old_size, init, lm_head_init)
    n_split = sum(1 for s in sources if s)
    log.info("resize %s: %d -> %d tokens (%d rows%s), init %s%s", model_dir, old_size, new_size,
             rows, f", padded to a multiple of {pad_to_multiple_of}" if pad_to_multiple_of else "",
             f"{init} (lm_head: {lm_head_init})", f" ({n_split} from base pieces, {len(added) - n_split} mean)"
             if "subword-mean" in (init, lm_head_init) else "")
    std = float(cfg.get("initializer_range", 0.02))
    return ResizePlan(model_dir=model_dir, tokenizer_path=tokenizer_path, cfg=cfg, shards=shards, tied=tied,
                      max_bytes=max_bytes, old_rows=old_rows, old_size=old_size, new_size=new_size, rows=rows,
                      new_tok=new_tok, init=init, lm_head_init=lm_head_init, sources=sources, n_split=n_split,
                      std=std)


def _new_row_sources(base_tok_path: Path, added, no_text, old_size: int, init: str, lm_head_init: str) -> list:
    """Per new token, the base ids whose rows subword-mean averages (None: the mean row); all None
    when neither matrix uses subword-mean."""
    base_sp = find_sp_model(base_tok_path)
    if "subword-mean" in (init, lm_head_init) and base_sp is None and is_bpe_json_base(base_tok_path):
        return bpe_subword_sources(base_tok_path, added, no_text, old_size)
    if "subword-mean" in (init, lm_head_init):
        if base_sp is None:
            raise UserError(f"--init subword-mean needs the base SentencePiece model: no tokenizer.model "
                            f"in {base_tok_path}; pass it with --base-tokenizer, or use --init mean")
        return subword_sources(base_sp, added, no_text, old_size)
    return [None] * len(added)


def _write_shards(plan: ResizePlan, tensors, shard_plan, tmp: Path, seed: int) -> list:
    """Stream every tensor into the planned shards, embed_tokens and lm_head resized on the way (old rows
    copied, new rows initialised); returns the output shard names."""
    writer = ShardWriter(tmp, shard_plan)
    for shard_i, shard in enumerate(plan.shards):
        with Reader(shard) as f:
            for name in (n for s, n, _, _ in tensors if s == shard):
                t = f.get(name)
                if name in (EMBED, LM_HEAD):
                    t = build_matrix(t, plan.old_size, plan.rows, plan.sources,
                                     plan.lm_head_init if name == LM_HEAD else plan.init,
                                     seed=seed + (name == LM_HEAD), std=plan.std)
                writer.write(name, t)
                del t
        log.info("shard %d/%d done (%s), peak RSS %.2f GB", shard_i + 1, len(plan.shards), shard.name,
                 peak_rss_bytes() / 1e9)
    return writer.finish()


def _write_tokenizer_and_configs(plan: ResizePlan, tmp: Path) -> None:
    """config.json with the new vocab_size (and the base's, for new_rows_only), generation_config.json,
    and the merged tokenizer, so AutoModelForCausalLM and AutoTokenizer load the output alone."""
    tokenizer_path = plan.tokenizer_path
    write_resized_configs(tmp, plan.cfg, plan.model_dir, rows=plan.rows, tokenizer_size=plan.new_size,
                          tokenizer=plan.new_tok, base_vocab_size=plan.old_size)
    save_tokenizer(plan.new_tok, tmp)
    src_json = Path(tokenizer_path) / "tokenizer.json"
    if src_json.is_file() and not (Path(tokenizer_path) / "tokenizer.model").is_file():
        # a tokenizer.json tokenizer: the very file (a re-save writes the same ids in other bytes, and
        # shards packed with the merged tokenizer are keyed by its bytes: pretrain/shards.py)
        shutil.copyfile(src_json, tmp / "tokenizer.json")
    if (Path(tokenizer_path) / "merge_report.json").is_file():
        shutil.copyfile(Path(tokenizer_path) / "merge_report.json", tmp / "merge_report.json")


def _report(plan: ResizePlan, seed: int, out_files: list, t0: float) -> dict:
    """resize_report.json: the sizes and the inits, so the output can be traced to its inputs."""
    init, lm_head_init, n_added = plan.init, plan.lm_head_init, plan.new_size - plan.old_size
    return {
        "model": str(plan.model_dir), "tokenizer": str(plan.tokenizer_path), "init": init,
        "lm_head_init": lm_head_init,
        "old_vocab": plan.old_size, "new_vocab": plan.new_size, "rows": plan.rows,
        "padding_rows": plan.rows - plan.new_size, "rows_from_base_pieces": plan.n_split,
        "rows_mean_fallback": n_added - plan.n_split if "subword-mean" in (init, lm_head_init) else None,
        "tied_embeddings": plan.tied, "seed": seed, "shards_in": len(plan.shards), "shards_out": out_files,
        "peak_rss_bytes": peak_rss_bytes(), "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------
# CLI.

def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint dir (safetensors) with its tokenizer")
    parser.add_argument("--tokenizer", required=True,
                        help="the merged tokenizer (HF dir or tokenizer.model); its first ids must be "
                             "the model's tokenizer's")
    parser.add_argument("--out", required=True, help="output checkpoint dir (written atomically)")
    parser.add_argument("--init", choices=INITS, default="subword-mean",
                        help="initialisation of the new embed_tokens rows (default: subword-mean)")
    parser.add_argument("--lm-head-init", choices=LM_HEAD_INITS, default=None,
                        help="initialisation of the new lm_head rows (default: zero with "
                             "--init subword-mean, else the same as --init); see above for why")
    parser.add_argument("--pad-to-multiple-of", type=int_range(1, 1 << 16), default=None, metavar="N",
                        help="pad the rows to a multiple of N (e.g. 64) for faster matmuls; padding "
                             "rows are never produced by the tokenizer and marked in config.json")
    parser.add_argument("--base-tokenizer", default=None,
                        help="the tokenizer the model was trained with (default: the one in --model)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of --init random (default 0)")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest output shard, which bounds peak memory (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    with output_lock(args.out, "zhllama vocab resize", "checkpoint"):   # checks --out first
        report = resize_checkpoint(args.model, args.tokenizer, args.out, init=args.init,
                                   lm_head_init=args.lm_head_init,
                                   pad_to_multiple_of=args.pad_to_multiple_of,
                                   base_tokenizer=args.base_tokenizer, seed=args.seed,
                                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(json.dumps(report, ensure_ascii=False))
    return 0
