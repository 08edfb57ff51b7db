"""Merge Chinese tokens into a byte-level BPE base (`tokenizer.json`: LLaMA-3.x, SmolLM2, Mistral-NeMo).

    zhllama vocab merge --base smollm2/ --add zh_bpe/ --out merged_tokenizer

The byte-level counterpart of the SentencePiece merge in `vocab/merge.py`. The base keeps everything:
normalizer, pre-tokenizer, post-processor, decoder, its vocabulary ids, its merges (in order) and its
added/special tokens with their ids. Appended:

  tokens of the added model (`vocab train --base`) whose bytes can only occur in text containing a
  CJK character (`zhllama.bpe.is_cjk_safe`): whole CJK words and characters, and the leading bytes of a
  CJK character (in byte-level BPE a 3-byte character is built by two merges, so its first two bytes
  are a token of their own; only leading bytes whose every completion is CJK qualify),

each with one merge, after all the base's merges: the added model's merge for it when both halves
are in the merged vocabulary, else the first split into two merged-vocabulary tokens (at a character
boundary if there is one). New ids start after the base's largest id, added tokens included
(LLaMA-3: after <|reserved_special_token_247|> = 128255, so 128256 onward; SmolLM2: 49152 onward):
every base id, special ones too, keeps its row, and the resized model's old rows come first.

Why CJK-free text is tokenized exactly as before: a merge can only fire where its result's bytes
occur; those bytes never occur in CJK-free text; every base merge keeps its rank (the new ones come
after) and the pre-tokenizer is unchanged. Tested on English prose.

Reachability, to a fixed point: a token with whole-character text is reachable when encoding that
text alone yields exactly it; a leading-bytes token when it appears in the encoding of at least one
character that starts with those bytes. Checked with merges only (`ignore_merges` off, as in
LLaMA-3's tokenizer.json: stricter than the tokenizer as written). Unreachable tokens, and tokens
without a merge once others are dropped, are removed and the check repeats.

Output (atomically): tokenizer.json, the base's tokenizer_config.json / special_tokens_map.json
(unchanged: every base id is unchanged), merge_report.json. The base's added tokens that lie outside
its model vocabulary (LLaMA-3's 256 specials) are also listed in the model vocabulary, at their own
ids: `tokenizers` would renumber them otherwise (see `build_json`).
"""

import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from zhllama import bpe
from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, sha256_file
from zhllama.log import get_logger
from zhllama.vocab.merge import fit_max_vocab

log = get_logger("zhllama.vocab.bpe_merge")

MAX_FIXED_POINT_ITERATIONS = 50
COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _candidates(base_ids: Dict[str, int], add: dict, counts: dict) -> List[str]:
    """CJK-safe tokens of the added model that the base lacks, in the added model's id order."""
    out = []
    for tok, _ in sorted(add["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if tok in base_ids:
            counts["skipped_duplicate"] += 1
            continue
        data = bpe.token_bytes(tok)
        if data is None:
            counts["skipped_not_byte_level"] += 1
            continue
        if not bpe.is_cjk_safe(data):
            counts["filtered_no_cjk"] += 1
            continue
        out.append(tok)
    return out


def _split_points(tok: str) -> List[int]:
    """Where `tok` may be split into two tokens: character boundaries first, then inside characters."""
    data = bpe.token_bytes(tok)
    bounds, i = [], 0
    while i < len(data):
        n = bpe._seq_len(data[i]) or 1
        i += n
        if i < len(data):
            bounds.append(i)
    return bounds + [k for k in range(1, len(tok)) if k not in bounds]


def assign_merges(cands: List[str], base_vocab, add_merge: Dict[str, Tuple[str, str]]):
    """(tokens, merges, tokens without one): a merge (left, right) for every candidate whose halves are
    tokens. A half that is missing but CJK-safe (e.g. the first two bytes of a character whose added
    model merge was first-byte + last-two-bytes, a suffix that is never safe) is added just before
    the token, with its own merge, recursively: so no CJK character is lost for want of a prefix."""
    have = set(base_vocab) | set(cands)
    merges: Dict[str, Tuple[str, str]] = {}
    order: List[str] = []
    missing: List[str] = []

    def derive(tok: str, depth: int) -> bool:
        if tok in merges or tok in base_vocab:
            return True
        pair = add_merge.get(tok)
        if pair is None or pair[0] not in have or pair[1] not in have:
            pair = next(((tok[:k], tok[k:]) for k in _split_points(tok)
                         if tok[:k] in have and tok[k:] in have), None)
        if pair is None and depth < 4:
            for k in _split_points(tok):
                a, b = tok[:k], tok[k:]
                if all(x in have or bpe.is_cjk_safe(bpe.token_bytes(x)) for x in (a, b)):
                    new = [x for x in (a, b) if x not in have]
                    have.update(new)
                    if all(derive(x, depth + 1) for x in new):
                        pair = (a, b)
                        break
                    have.difference_update(x for x in new if x not in merges)
        if pair is None:
            return False
        for x in pair:            # a half that is itself new must come first
            if x not in base_vocab and x not in merges and not derive(x, depth + 1):
                missing.append(x)  # dropped; `tok` may split otherwise in the next pass
                return True
        merges[tok] = pair
        order.append(tok)
        return True

    for tok in cands:
        if tok not in merges and not derive(tok, 0):
            missing.append(tok)
    return order, merges, list(dict.fromkeys(missing))


def build_json(base: dict, cands: List[str], merges: Dict[str, Tuple[str, str]], first_id: int) -> dict:
    """The base tokenizer.json with `cands` appended (ids from `first_id`) and their merges after the base's."""
    out = json.loads(json.dumps(base))
    vocab = out["model"]["vocab"]
    if cands:
        # `tokenizers` numbers an added token that is not in the model vocabulary from the model
        # vocabulary's size, whatever id the file gives it: LLaMA-3's specials (128000..128255, outside
        # the 128000-token model vocabulary) would move onto the new tokens' ids. Listing them in the
        # model vocabulary at their own ids pins them; no merge produces them and they are still
        # matched as special tokens before the model runs.
        for t in out.get("added_tokens") or []:
            vocab.setdefault(t["content"], int(t["id"]))
    for k, tok in enumerate(cands):
        vocab[tok] = first_id + k
    as_str = bool(base["model"]["merges"]) and isinstance(base["model"]["merges"][0], str)
    for tok in cands:
        a, b = merges[tok]
        out["model"]["merges"].append(f"{a} {b}" if as_str else [a, b])
    return out


def unreachable_tokens(data: dict, tokens: List[str]) -> List[str]:
    """The tokens (strings) of `tokens` that encoding cannot produce (see the module doc), checked with
    merges only."""
    from tokenizers import Tokenizer
    strict = json.loads(json.dumps(data))
    strict["model"]["ignore_merges"] = False
    tk = Tokenizer.from_str(json.dumps(strict))
    vocab = data["model"]["vocab"]
    whole, partial = [], []
    for tok in tokens:
        text, tail = bpe.split_utf8(bpe.token_bytes(tok))
        (partial if tail else whole).append((tok, text, tail))
    bad = []
    if whole:
        encs = tk.encode_batch([t for _, t, _ in whole], add_special_tokens=False)
        bad += [tok for (tok, _, _), e in zip(whole, encs) if e.ids != [vocab[tok]]]
    for tok, text, tail in partial:
        texts = [text + c for c in bpe.completions(tail)]
        tid = vocab[tok]
        if not any(tid in e.ids for e in tk.encode_batch(texts, add_special_tokens=False)):
            bad.append(tok)
    return bad


def merge_json(base: dict, add: dict, *, max_vocab: Optional[int] = None, drop_unreachable: bool = True):
    """Merge two parsed byte-level BPE tokenizer.json files. Returns (merged dict, report dict)."""
    t0 = time.perf_counter()
    base_ids = bpe.all_ids(base)
    first_id = max(base_ids.values()) + 1
    base_merges = list(base["model"]["merges"])
    add_merge = {a + b: (a, b) for a, b in bpe.merges_as_pairs(add["model"]["merges"])}
    counts = {"add_tokens": len(add["model"]["vocab"]), "skipped_duplicate": 0, "skipped_not_byte_level": 0,
              "filtered_no_cjk": 0, "candidates": 0, "capped": 0, "dropped_no_merge": 0,
              "dropped_unreachable": 0, "added": 0, "added_leading_bytes": 0,
              "synthesized_prefixes": 0}
    cands = _candidates(base_ids, add, counts)
    counts["candidates"] = len(cands)
    cands = fit_max_vocab(cands, max_vocab, first_id, counts)

    dropped_unreachable, dropped_no_merge = [], []
    iterations = 0
    while True:
        iterations += 1
        if iterations > MAX_FIXED_POINT_ITERATIONS:
            raise RuntimeError("reachability did not reach a fixed point")  # a bug, not bad input
        ordered, merges, missing = assign_merges(cands, base["model"]["vocab"], add_merge)
        if missing:
            dropped_no_merge += missing
            gone = set(missing)
            cands = [t for t in cands if t not in gone]
            continue
        counts["synthesized_prefixes"] = len(set(ordered) - set(cands))
        cands = ordered
        merged = build_json(base, cands, merges, first_id)
        bad = unreachable_tokens(merged, cands)
        log.info("reachability pass %d: %d added, %d unreachable", iterations, len(cands), len(bad))
        if not bad or not drop_unreachable:
            break
        dropped_unreachable += bad
        gone = set(bad)
        cands = [t for t in cands if t not in gone]

    # The invariants, checked on what is written: base ids and merges unchanged.
    ids_after = bpe.all_ids(merged)
    if any(ids_after.get(t) != i for t, i in base_ids.items()):
        raise RuntimeError("merge changed a base id")  # a bug
    if merged["model"]["merges"][:len(base_merges)] != base_merges:
        raise RuntimeError("merge changed the base merges")  # a bug

    def text(tok):
        t, tail = bpe.split_utf8(bpe.token_bytes(tok))
        return t + (f"<{tail.hex()}..>" if tail else "")

    counts["dropped_no_merge"] = len(dropped_no_merge)
    counts["dropped_unreachable"] = len(dropped_unreachable)
    counts["added"] = len(cands)
    counts["added_leading_bytes"] = sum(1 for t in cands if bpe.split_utf8(bpe.token_bytes(t))[1])
    report = {
        "mode": "bpe",
        "counts": counts,
        "first_new_id": first_id,
        "base_ids_kept": len(base_ids),
        "base_merges_kept": len(base_merges),
        "merges_added": len(cands),
        "final_size": first_id + len(cands),
        "reachability_iterations": iterations,
        "unreachable_added": len(bad),
        "dropped_unreachable_examples": [text(t) for t in dropped_unreachable[:100]],
        "dropped_no_merge_examples": [text(t) for t in dropped_no_merge[:100]],
        "added_examples": [text(t) for t in cands[:50]],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return merged, report


def merge_tokenizers(base, add, out_dir, *, max_vocab: Optional[int] = None, drop_unreachable: bool = True,
                     overwrite: bool = False) -> dict:
    """Merge the added byte-level BPE tokenizer (`vocab train --base` output) into `base` (a
    tokenizer.json or a directory holding one) and write an HF tokenizer directory. Returns the report."""
    base_file, add_file = bpe.tokenizer_json_path(base), bpe.tokenizer_json_path(add)
    if add_file is None:
        raise UserError(f"{add}: no tokenizer.json (a BPE base needs the added model trained with "
                        f"`zhllama vocab train --base {base}`)")
    base_data, add_data = bpe.read_tokenizer_json(base_file), bpe.read_tokenizer_json(add_file)
    bpe.check_byte_level_bpe(base_data, base_file)
    bpe.check_byte_level_bpe(add_data, add_file)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        merged, report = merge_json(base_data, add_data, max_vocab=max_vocab, drop_unreachable=drop_unreachable)
        report = {"mode": report.pop("mode"),
                  "base": {"path": str(base_file), "sha256": sha256_file(base_file),
                           "vocab": len(bpe.all_ids(base_data)), "merges": len(base_data["model"]["merges"]),
                           "added_tokens": len(base_data.get("added_tokens") or [])},
                  "add": {"path": str(add_file), "sha256": sha256_file(add_file),
                          "vocab": len(add_data["model"]["vocab"])},
                  **report}
        (tmp / bpe.TOKENIZER_JSON).write_text(json.dumps(merged, ensure_ascii=False, indent=2) + "\n",
                                              encoding="utf-8")
        for name in COPIED_FILES:
            if (base_file.parent / name).is_file():
                shutil.copyfile(base_file.parent / name, tmp / name)
        report["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / "merge_report.json", report)
    log.info("wrote %s (%d tokens)", out_dir, report["final_size"])
    return report
