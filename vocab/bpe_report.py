"""`vocab report` figures for a byte-level BPE tokenizer (tokenizer.json), the same columns as for a
SentencePiece model (see `vocab/report.py`), measured with `tokenizers`:

- byte fallback: share of tokens that are not whole characters (bytes of a character the vocabulary
  lacks as one token): what byte fallback is for a SentencePiece model;
- unreachable: tokens added to a reference tokenizer.json it extends (ids after the reference's
  largest), checked as `vocab merge` does; without such a reference, every whole-text token of the
  model vocabulary;
- slow/fast differ: transformers' `AutoTokenizer` on the directory against `tokenizers` on its
  tokenizer.json (no BOS, special-token parsing off on both sides).
"""

from pathlib import Path
from typing import List, Optional

from zhllama import bpe
from zhllama.model_config import TRUST_REMOTE_CODE
from zhllama.textenc import encode_text
from zhllama.vocab.bpe_merge import unreachable_tokens
from zhllama.vocab.report import reference_figures, token_figures


def encode_lines(tk, lines: List[str]) -> List[List[int]]:
    """Ids of each line as plain text: no BOS/EOS, special tokens not parsed out of the text."""
    tk.encode_special_tokens = True
    return [e.ids for e in tk.encode_batch(lines, add_special_tokens=False)]


def measure(path, lines: List[str], *, reference: Optional[str] = None, ref_ids=None, parity: bool = True) -> dict:
    data = bpe.read_tokenizer_json(path)
    bpe.check_byte_level_bpe(data, bpe.tokenizer_json_path(path))
    tk = bpe.load_tokenizer(path)
    ids = encode_lines(tk, lines)
    vocab = data["model"]["vocab"]
    partial = {i for t, i in vocab.items() if (b := bpe.token_bytes(t)) is None or (s := bpe.split_utf8(b)) is None
               or s[1]}
    r = {"tokenizer": str(path), "vocab_size": tk.get_vocab_size(with_added_tokens=True),
         "model_type": "byte-level bpe", **token_figures(lines, ids, partial)}

    scope, check = "all", None
    if reference is not None and bpe.is_bpe_json_base(reference):
        ref_ids_map = bpe.all_ids(bpe.read_tokenizer_json(reference))
        mine = bpe.all_ids(data)
        if all(mine.get(t) == i for t, i in ref_ids_map.items()):
            first = max(ref_ids_map.values()) + 1
            scope, check = "added", [t for t, i in vocab.items() if i >= first]
    if check is None:
        check = [t for t, i in vocab.items() if i not in partial]
    bad = unreachable_tokens(data, check)
    r["unreachable"] = len(bad)
    r["unreachable_examples"] = bad[:20]
    r["unreachable_checked"] = len(check)
    r["unreachable_scope"] = scope

    if parity:
        r["parity_loader"] = "AutoTokenizer.from_pretrained(dir) vs tokenizers"
        p = Path(path)
        if p.is_dir():
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(str(p), trust_remote_code=TRUST_REMOTE_CODE)
            differ = [t for t, e in zip(lines, ids) if encode_text(hf, t) != e]
            r["parity_differ"] = len(differ)
            r["parity_bos_ok"] = None
            r["parity_examples"] = differ[:3]
        else:
            r["parity_differ"] = None

    if ref_ids is not None:
        r.update(reference_figures(lines, ids, ref_ids))
    return r
