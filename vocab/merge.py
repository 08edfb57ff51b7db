"""Merge the pieces of a Chinese SentencePiece model into the LLaMA tokenizer.

    zhllama vocab merge --base llama/tokenizer.model --add zh/zh_sp.model --out merged_tokenizer

The base (a `tokenizer.model`, or a Hugging Face directory holding one, old `LLaMATokenizer`
checkpoints included) keeps its pieces, ids, scores, normalizer and trainer spec. The default merge
("v2") appends only pieces that

  1. are normal pieces of the added model (not <unk>/<s>/</s>, not byte pieces),
  2. are not already in the base,
  3. contain at least one CJK character (ideographs, kana, hangul, CJK punctuation, fullwidth forms;
     see `zhllama.spm.CJK_RANGES`),
  4. are made only of characters that are pieces of the merged vocabulary (HF tokenizers turn an
     unknown character into bytes before merging, sentencepiece does not),

in the added model's order, with scores strictly below the base's lowest score (so every base merge
wins over every new one, and the new pieces keep their relative order). Then every added piece is
checked for reachability (encoding its text alone must yield it) with the merged model; unreachable
pieces are dropped and the check repeats until none is left. Consequences, each tested:

- text without a CJK character tokenizes exactly as with the base (no added piece can match it);
- every added piece is reachable, so no embedding row is dead;
- the HF tokenizer written next to it encodes exactly like sentencepiece (scores are distinct).

`--compat v1` reproduces Chinese-LLaMA-Alpaca's merge_tokenizers.py instead: every piece of the added
model not already in the base is appended with score 0 (49,953 pieces for LLaMA + their 20k model).
Use it to migrate checkpoints trained on that tokenizer; `merge_report.json` records what it breaks.

Output (written atomically): `tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, `merge_report.json`.
"""

import time
from pathlib import Path
from typing import Optional

import numpy as np

from zhllama import spm as _spm
from zhllama.argtypes import int_range
from zhllama.bpe import is_bpe_json_base, read_tokenizer_json, tokenizer_json_path
from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, sha256_file
from zhllama.hf_tokenizer import save_hf_tokenizer
from zhllama.log import get_logger
from zhllama.model_config import check_no_remote_code
from zhllama.outlock import output_lock

log = get_logger("zhllama.vocab.merge")

COMPAT_MODES = ("v1",)
MAX_FIXED_POINT_ITERATIONS = 50


def add_arguments(parser):
    parser.add_argument("--base", required=True,
                        help="base tokenizer: a sentencepiece tokenizer.model, or a HF directory holding one; "
                             "or a byte-level BPE tokenizer.json / a directory with one and no tokenizer.model "
                             "(LLaMA-3, SmolLM2: see vocab/bpe_merge.py)")
    parser.add_argument("--add", required=True, help="the Chinese sentencepiece model (e.g. DIR/zh_sp.model); "
                                                     "for a BPE base, the `vocab train --base` output directory")
    parser.add_argument("--out", required=True, help="output directory (HF tokenizer dir + merge_report.json)")
    parser.add_argument("--compat", choices=COMPAT_MODES, default=None,
                        help="v1: reproduce Chinese-LLaMA-Alpaca's merge exactly (append every new piece with "
                             "score 0); default: the CJK-only, reachability-checked merge")
    parser.add_argument("--max-vocab", type=int_range(1, 1 << 24), default=None,
                        help="cap the merged vocabulary at this many pieces (the added model's lowest-priority "
                             "pieces are left out first)")
    parser.add_argument("--keep-unreachable", action="store_true",
                        help="keep added pieces that no input can produce (default: drop them)")
    parser.add_argument("--model-max-length", type=int_range(1, 1 << 30), default=None,
                        help="model_max_length written to tokenizer_config.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _run_bpe(args) -> int:
    from zhllama.vocab import bpe_merge  # here, not at the top: bpe_merge imports this module

    if args.compat or args.model_max_length is not None:
        raise UserError("--compat and --model-max-length apply to SentencePiece bases only")
    report = bpe_merge.merge_tokenizers(args.base, args.add, args.out, max_vocab=args.max_vocab,
                                        drop_unreachable=not args.keep_unreachable, overwrite=args.overwrite)
    c = report["counts"]
    print(f"merged {report['first_new_id']:,} + {c['added']:,} = {report['final_size']:,} tokens (byte-level bpe; "
          f"{c['added_leading_bytes']:,} of them leading bytes of CJK characters); skipped as duplicate "
          f"{c['skipped_duplicate']:,}, without CJK {c['filtered_no_cjk']:,}, without a merge "
          f"{c['dropped_no_merge']:,}, unreachable {c['dropped_unreachable']:,} dropped -> {args.out}")
    return 0


def _is_tokenizers_file(path) -> bool:
    try:
        read_tokenizer_json(path)
        return True
    except UserError:
        return False


def run(args) -> int:
    with output_lock(args.out, "zhllama vocab merge", "tokenizer"):   # checks --out first
        return _run(args)


def _run(args) -> int:
    for folder in (args.base, args.add):
        check_no_remote_code(folder, classes=False)  # its tokenizer_config.json would be shipped on
    if is_bpe_json_base(args.base) and tokenizer_json_path(args.add) is not None:
        return _run_bpe(args)
    if is_bpe_json_base(args.base) and _is_tokenizers_file(args.base):
        raise UserError(f"--base {args.base} is a tokenizer.json tokenizer: --add must be a tokenizer.json "
                        f"too (`zhllama vocab train --base {args.base} ...`), not the SentencePiece model {args.add}")
    report = merge_tokenizers(args.base, args.add, args.out, compat=args.compat, max_vocab=args.max_vocab,
                              drop_unreachable=not args.keep_unreachable, overwrite=args.overwrite,
                              model_max_length=args.model_max_length)
    c = report["counts"]
    if report["mode"] == "v2":
        unreach = f"unreachable {c['dropped_unreachable']:,} dropped"
    else:
        unreach = f"{report['unreachable_added']:,} unreachable kept"
    print(f"merged {report['base']['pieces']:,} + {c['added']:,} = {report['final_size']:,} pieces "
          f"({report['mode']}); skipped as duplicate {c['skipped_duplicate']:,}, without CJK "
          f"{c['filtered_no_cjk']:,}, with a character outside the vocabulary {c.get('dropped_unknown_char', 0):,}, "
          f"{unreach} -> {args.out}")
    return 0


def _float32_below(x: float) -> float:
    """The largest float32 strictly below `x` by at least 1 (scores are stored as float32)."""
    y = np.float32(np.float32(x) - np.float32(1.0))
    while y >= np.float32(x):
        y = np.nextafter(y, np.float32(-np.inf))
    return float(y)


def _candidates(base, add, counts):
    """Normal CJK pieces of `add` not in `base`, in `add`'s order."""
    have = {p.piece for p in base.pieces}
    seen = set()
    out = []
    for p in add.pieces:
        if p.type not in (_spm.NORMAL, _spm.USER_DEFINED):
            counts["skipped_special"] += 1
            continue
        if p.piece in have:
            counts["skipped_duplicate"] += 1
            continue
        if p.piece in seen:
            counts["skipped_duplicate"] += 1
            continue
        if not _spm.has_cjk(p.piece):
            counts["filtered_no_cjk"] += 1
            continue
        seen.add(p.piece)
        out.append(p)
    return out


def _build(base, pieces, score_top: float):
    """base + `pieces` with strictly decreasing float32 scores below `score_top`."""
    m = _spm.new_proto()
    m.CopyFrom(base)
    s = score_top
    for p in pieces:
        s = _float32_below(s)
        n = m.pieces.add()
        n.piece = p.piece
        n.score = s
        n.type = p.type
    return m


def _merge_v1(base, add, counts):
    """Chinese-LLaMA-Alpaca's merge_tokenizers.py: append every piece not in the base, score 0."""
    m = _spm.new_proto()
    m.CopyFrom(base)
    have = {p.piece for p in base.pieces}
    for p in add.pieces:
        if p.piece in have:
            counts["skipped_duplicate"] += 1
            continue
        n = m.pieces.add()
        n.piece = p.piece
        n.score = 0
        have.add(p.piece)
    return m


def fit_max_vocab(cands: list, max_vocab: Optional[int], base_size: int, counts: dict,
                  essential=lambda c: False) -> list:
    """The candidates (best first) that fit under --max-vocab: every `essential` one, then the others
    in order; counts["capped"] is how many are left out. Both merges (SentencePiece, byte-level BPE)."""
    if max_vocab is None:
        return cands
    room = max_vocab - base_size
    if room < 0:
        raise UserError(f"--max-vocab {max_vocab} is smaller than the base vocabulary ({base_size})")
    others_room = max(room - sum(1 for c in cands if essential(c)), 0)
    out, others = [], 0
    for c in cands:
        if essential(c):
            out.append(c)
        elif others < others_room:
            out.append(c)
            others += 1
    out = out[:room]
    counts["capped"] = len(cands) - len(out)
    return out


def merge_protos(base, add, *, compat: Optional[str] = None, max_vocab: Optional[int] = None,
                 drop_unreachable: bool = True):
    """Merge two ModelProtos in memory. Returns (merged ModelProto, report dict without file info)."""
    base = _spm.load_proto(base, "base")
    add = _spm.load_proto(add, "added model")
    n_base = len(base.pieces)
    counts = {"add_pieces": len(add.pieces), "skipped_special": 0, "skipped_duplicate": 0,
              "filtered_no_cjk": 0, "candidates": 0, "capped": 0, "dropped_unknown_char": 0,
              "dropped_unreachable": 0, "added": 0}
    report = {"mode": compat or "v2", "counts": counts}
    t0 = time.perf_counter()

    if compat == "v1":
        merged = _merge_v1(base, add, counts)
        counts["candidates"] = counts["added"] = len(merged.pieces) - n_base
        unreachable = _spm.unreachable_pieces(merged, range(n_base, len(merged.pieces)))
        report["unreachable_added"] = len(unreachable)
        report["unreachable_examples"] = [merged.pieces[i].piece for i in unreachable[:50]]
        report["scores"] = {"new_pieces": 0.0}
        report["notes"] = ("compat v1 appends pieces without CJK and gives every new piece score 0 (above every "
                           "base piece): text without CJK can tokenize differently from the base, some added "
                           "pieces are unreachable, and equal scores make HF tokenizers differ from "
                           "sentencepiece on some lines")
    elif compat is None:
        if base.trainer_spec.model_type != _spm.BPE:
            raise UserError(f"the base tokenizer is a {_spm.model_type_name(base)} model; the merge supports "
                            f"BPE bases (LLaMA-style) only")
        cands = _candidates(base, add, counts)
        counts["candidates"] = len(cands)
        # Under --max-vocab keep every single character (the pieces everything else is built from) and
        # leave out the lowest-priority multi-character pieces.
        cands = fit_max_vocab(cands, max_vocab, n_base, counts, essential=lambda p: len(p.piece) == 1)
        # A piece with a character that is not itself a piece (e.g. "℃／" when "℃", not CJK, was
        # filtered out and the base lacks it) is reachable in sentencepiece, which merges unknown
        # characters, but not in HF tokenizers, which turn unknown characters into bytes first.
        chars = {p.piece for p in base.pieces if p.type in (_spm.NORMAL, _spm.USER_DEFINED) and len(p.piece) == 1}
        chars |= {p.piece for p in cands if len(p.piece) == 1}
        unknown = [p.piece for p in cands if any(c not in chars for c in p.piece)]
        if unknown:
            bad = set(unknown)
            cands = [p for p in cands if p.piece not in bad]
        counts["dropped_unknown_char"] = len(unknown)
        report["dropped_unknown_char_examples"] = unknown[:100]
        normal_scores = [p.score for p in base.pieces if p.type in (_spm.NORMAL, _spm.USER_DEFINED)]
        score_top = min(normal_scores) if normal_scores else 0.0
        dropped = []
        iterations = 0
        while True:
            iterations += 1
            merged = _build(base, cands, score_top)
            unreachable = _spm.unreachable_pieces(merged, range(n_base, len(merged.pieces)))
            log.info("reachability pass %d: %d added, %d unreachable", iterations, len(cands), len(unreachable))
            if not unreachable or not drop_unreachable:
                break
            if iterations >= MAX_FIXED_POINT_ITERATIONS:
                raise RuntimeError("reachability did not reach a fixed point")  # a bug, not bad input
            bad = {merged.pieces[i].piece for i in unreachable}
            dropped += [merged.pieces[i].piece for i in unreachable]
            cands = [p for p in cands if p.piece not in bad]
        counts["dropped_unreachable"] = len(dropped)
        counts["added"] = len(cands)
        report["reachability_iterations"] = iterations
        report["dropped_unreachable_examples"] = dropped[:100]
        report["unreachable_added"] = len(unreachable)
        added_scores = [merged.pieces[i].score for i in range(n_base, len(merged.pieces))]
        report["scores"] = {"base_lowest": score_top,
                            "new_highest": max(added_scores) if added_scores else None,
                            "new_lowest": min(added_scores) if added_scores else None}
    else:
        raise UserError(f"unknown --compat mode {compat!r} (known: {', '.join(COMPAT_MODES)})")

    # The invariant every mode keeps: ids 0..n_base-1 are the base's, unchanged.
    for i in range(n_base):
        a, b = base.pieces[i], merged.pieces[i]
        if a.piece != b.piece or a.type != b.type or a.score != b.score:
            raise RuntimeError(f"merge changed base piece {i}")  # a bug
    report["base_ids_kept"] = n_base
    report["final_size"] = len(merged.pieces)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return merged, report


def merge_tokenizers(base, add, out_dir, compat: Optional[str] = None, *, max_vocab: Optional[int] = None,
                     drop_unreachable: bool = True, overwrite: bool = False,
                     model_max_length: Optional[int] = None) -> dict:
    """Merge `add` (a sentencepiece model) into `base` (a tokenizer.model or HF dir) and write an HF
    tokenizer directory at `out_dir` (atomically) with `merge_report.json`. Returns the report.

    `compat=None` is the CJK-only, reachability-checked merge; `compat="v1"` reproduces
    Chinese-LLaMA-Alpaca's merge. Raises `UserError`/`InputError` for bad inputs (one line, naming the
    file) and for an existing `out_dir` without `overwrite`.
    """

    base_path = _spm.sp_model_path(base)
    add_path = _spm.sp_model_path(add)
    out_dir = Path(out_dir)
    base_proto = _spm.load_proto(base_path, "base")
    add_proto = _spm.load_proto(add_path, "added model")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        merged, report = merge_protos(base_proto, add_proto, compat=compat, max_vocab=max_vocab,
                                      drop_unreachable=drop_unreachable)
        report = {
            "mode": report.pop("mode"),
            "base": {"path": str(base_path), "sha256": sha256_file(base_path), **_spm.describe(base_proto)},
            "add": {"path": str(add_path), "sha256": sha256_file(add_path), **_spm.describe(add_proto)},
            **report,
        }
        save_hf_tokenizer(merged, tmp, model_max_length=model_max_length)
        report["files"] = {name: sha256_file(Path(tmp) / name) for name in sorted(p.name for p in Path(tmp).iterdir())}
        atomic_write_json(Path(tmp) / "merge_report.json", report)
    log.info("wrote %s (%d pieces)", out_dir, report["final_size"])
    return report
