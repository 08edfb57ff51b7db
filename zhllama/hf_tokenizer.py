"""Writing and loading the Hugging Face tokenizer directory of a SentencePiece BPE model.

Stable API (used by other stages):

- `save_hf_tokenizer(sp_model, out_dir, *, model_max_length=None) -> dict`: writes `tokenizer.model`,
  `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` into `out_dir` (an existing
  directory, typically the temporary one of `zhllama.fsutil.atomic_dir`); returns what it wrote.
- `load_hf_tokenizer(path)`: the tokenizer of a directory (`AutoTokenizer.from_pretrained`), or of a
  bare `.model` file (built in memory the same way as `save_hf_tokenizer` builds tokenizer.json).
- `build_tokenizer(sp_model) -> tokenizers.Tokenizer`: the `tokenizers` object itself.
- `parity(sp_model, hf_tokenizer, texts) -> dict`: lines where the HF tokenizer and sentencepiece disagree.
- `make_portable(tok_dir, chat_template=...)`: rewrite a tokenizer dir's `tokenizer_config.json` so
  transformers 4.x and 5.x both load it (and ship or drop a chat template).

Why not let transformers convert `tokenizer.model` itself? transformers 5 builds `LlamaTokenizer` as a
`tokenizers` BPE whose merges are ranked by vocabulary id, with a `Metaspace(prepend_scheme="first")`
pre-tokenizer. Both disagree with sentencepiece on LLaMA's model:

1. sentencepiece BPE merges, at each step, the adjacent pair whose concatenation has the highest
   *score*; LLaMA gives `"▁▁"` (id 259) the score -1e9, so runs of spaces are merged last. Ranked by
   id, `"▁▁"` is one of the first merges, so runs of spaces split differently (e.g. 30 spaces become
   16+13 instead of 16+14 before a word).
2. `Metaspace` skips the dummy prefix when the text already starts with a space; sentencepiece
   (`add_dummy_prefix: true`, `remove_extra_whitespaces: false`) always adds it, so `"    x"` becomes
   five `▁` in sentencepiece and four in transformers.

The tokenizer.json written here ranks merges by sentencepiece score (ties: by the merged piece's id,
then the shorter left part first, which is what sentencepiece's leftmost rule gives for runs of one
character) and uses the normalizer sentencepiece uses (`Prepend("▁")` + `Replace(" ", "▁")`, plus
the model's precompiled charsmap if any) with no pre-tokenizer. It matches sentencepiece id for id.

`tokenizer_config.json` names `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)` loads
tokenizer.json exactly as written (transformers 4 and 5). `LlamaTokenizer.from_pretrained(dir)` (and
`LlamaTokenizerFast`, its alias in transformers 5) also loads the directory, but transformers 5
rebuilds its pre-tokenizer from scratch (keeping only vocab and merges): it then agrees with
sentencepiece on text that does not start with a space, and drops one `▁` on text that does. Use
`AutoTokenizer` or `load_hf_tokenizer`.
"""

import json
import os
from pathlib import Path
from typing import Iterable, List, Optional

from zhllama import spm as _spm
from zhllama.errors import UserError
from zhllama.model_config import TRUST_REMOTE_CODE, check_tokenizer_dir

# The four files `save_hf_tokenizer` writes for a SentencePiece model (what `vocab merge` reports).
HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Every file of a tokenizer directory that travels with a model: shipped with an adapter, copied byte for
# byte into a merged checkpoint (the ids training used). The HF files above plus added tokens, the chat
# template and the vocab merge report.
TOKENIZER_DIR_FILES = HF_TOKENIZER_FILES + ("added_tokens.json", "chat_template.jinja", "chat_template.json",
                                            "merge_report.json")


def generate_merges(proto) -> List[tuple]:
    """BPE merges ranked the way sentencepiece applies them: by the merged piece's score, highest
    first (ties: by its id), then its splits with the shorter left part first."""
    vocab = {}
    for i, p in enumerate(proto.pieces):
        vocab.setdefault(p.piece, i)
    symbol_ok = {p.piece for p in proto.pieces if p.type in (_spm.NORMAL, _spm.USER_DEFINED)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != _spm.NORMAL or len(p.piece) < 2:
            continue
        s = p.piece
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if left in symbol_ok and right in symbol_ok:
                ranked.append((-p.score, i, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _normalizer(proto):
    from tokenizers import Regex, normalizers
    ns = proto.normalizer_spec
    seq = []
    if ns.precompiled_charsmap:
        seq.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        seq += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        seq.append(normalizers.Prepend(_spm.SPACE))
    if not ns.HasField("escape_whitespaces") or ns.escape_whitespaces:
        seq.append(normalizers.Replace(" ", _spm.SPACE))
    return normalizers.Sequence(seq) if seq else None


def build_tokenizer(sp_model):
    """A `tokenizers.Tokenizer` that encodes exactly like sentencepiece for a BPE `sp_model` (path,
    bytes or ModelProto) with distinct piece scores."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    proto = _spm.load_proto(sp_model)
    if proto.trainer_spec.model_type != _spm.BPE:
        raise UserError(f"only BPE sentencepiece models can be written as a BPE tokenizer.json "
                        f"(this one is {_spm.model_type_name(proto)})")
    vocab = {}
    for i, p in enumerate(proto.pieces):
        vocab.setdefault(p.piece, i)
    unk = _spm.special_piece(proto, "unk", "<unk>")
    bpe = models.BPE(vocab=vocab, merges=generate_merges(proto), unk_token=unk, fuse_unk=True,
                     byte_fallback=bool(proto.trainer_spec.byte_fallback))
    tok = Tokenizer(bpe)
    tok.normalizer = _normalizer(proto)
    tok.pre_tokenizer = None
    steps = [decoders.Replace(_spm.SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)

    specials = [p.piece for p in proto.pieces if p.type in (_spm.UNKNOWN, _spm.CONTROL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    user = [p.piece for p in proto.pieces if p.type == _spm.USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(s, special=False, normalized=True) for s in user])
    bos_id = proto.trainer_spec.bos_id
    if 0 <= bos_id < len(proto.pieces):
        bos = proto.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tok


def _special_tokens(proto) -> dict:
    out = {}
    for kind, default in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", None)):
        piece = _spm.special_piece(proto, kind, default)
        if piece is not None:
            out[f"{kind}_token"] = piece
    return out


def save_hf_tokenizer(sp_model, out_dir, *, model_max_length: Optional[int] = None) -> dict:
    """Write the HF tokenizer files of `sp_model` (path, bytes or ModelProto) into `out_dir`.

    Files: `tokenizer.model` (the sentencepiece model, byte for byte as given/serialized),
    `tokenizer.json` (see the module doc: exact sentencepiece parity), `tokenizer_config.json`
    (`PreTrainedTokenizerFast`, BOS added, no EOS), `special_tokens_map.json`. `out_dir` is created
    if needed; the caller makes the write atomic (write into `atomic_dir`). Returns
    `{"files": [...], "vocab_size": N}`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(sp_model, (str, os.PathLike)):
        data = _spm.sp_model_path(sp_model).read_bytes()
        proto = _spm.load_proto(data)
    else:
        proto = _spm.load_proto(sp_model)
        data = proto.SerializeToString()
    (out / "tokenizer.model").write_bytes(data)
    build_tokenizer(proto).save(str(out / "tokenizer.json"))
    legacy_merges(out / "tokenizer.json")

    special = _special_tokens(proto)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "zhllama_note": ("tokenizer.json reproduces sentencepiece (tokenizer.model) id for id; load with "
                         "AutoTokenizer.from_pretrained(dir). transformers 5's LlamaTokenizer rebuilds the "
                         "pre-tokenizer and drops one leading '▁' on text that starts with a space."),
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    return {"files": list(HF_TOKENIZER_FILES), "vocab_size": len(proto.pieces)}


PORTABLE_CLASS = "PreTrainedTokenizerFast"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_KEEP = object()


def legacy_merges(tokenizer_json) -> bool:
    """Rewrite a BPE tokenizer.json's merges as "left right" strings (tokenizers < 0.20 reads only
    that; newer versions write pairs and read both). Skipped, returning False, when a piece holds a
    space (it could not be split back)."""
    path = Path(tokenizer_json)
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = (data.get("model") or {}).get("merges")
    if not merges or isinstance(merges[0], str):
        return True
    if any(" " in part for pair in merges for part in pair):
        return False
    data["model"]["merges"] = [" ".join(pair) for pair in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return True


def make_portable(tok_dir, *, chat_template=_KEEP) -> dict:
    """Make the tokenizer dir `tok_dir` load alike in transformers 4.x and 5.x; returns the new config.

    transformers 5's `save_pretrained` names its internal `TokenizersBackend` class (4.x: "Tokenizer
    class TokenizersBackend does not exist"); `LlamaTokenizer(Fast)` would rebuild the pre-tokenizer
    (module doc). With a tokenizer.json the class becomes `PreTrainedTokenizerFast`, which both
    versions load from tokenizer.json as written, and the BOS/EOS/UNK(/PAD) tokens are written out.
    Its merges are written in the format tokenizers < 0.20 (transformers 4.40-4.44) reads.
    `chat_template`: a Jinja text is written both as `chat_template` in tokenizer_config.json (what
    transformers 4.x before 4.43 reads) and as chat_template.jinja (5.x); None removes any; the
    default keeps what is there.
    """
    d = Path(tok_dir)
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if (d / "tokenizer.json").is_file():
        cfg["tokenizer_class"] = PORTABLE_CLASS
        legacy_merges(d / "tokenizer.json")
    special = {}
    map_file = d / "special_tokens_map.json"
    if map_file.is_file():
        special = {k: v for k, v in json.loads(map_file.read_text(encoding="utf-8")).items()
                   if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    elif (d / "tokenizer.model").is_file():
        special = _special_tokens(_spm.load_proto(d / "tokenizer.model"))
    for key, value in special.items():
        if cfg.get(key) in (None, ""):
            cfg[key] = value if isinstance(value, str) else value.get("content")
    if chat_template is not _KEEP:
        cfg.pop("chat_template", None)
        for name in (CHAT_TEMPLATE_FILE, "chat_template.json"):
            (d / name).unlink(missing_ok=True)
        if chat_template:
            cfg["chat_template"] = chat_template
            (d / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return cfg


def hf_tokenizer_from_proto(sp_model):
    """A transformers fast tokenizer built in memory from a sentencepiece model (no files)."""
    from transformers import PreTrainedTokenizerFast
    proto = _spm.load_proto(sp_model)
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(proto), clean_up_tokenization_spaces=False,
                                   **_special_tokens(proto))


def load_hf_tokenizer(path, **kwargs):
    """The transformers tokenizer of `path`: `AutoTokenizer.from_pretrained(dir)` for a directory, or
    an in-memory tokenizer built from a bare sentencepiece `.model` file."""
    p = Path(path)
    if p.is_file():
        return hf_tokenizer_from_proto(p)
    from transformers import AutoTokenizer
    check_tokenizer_dir(p)
    return AutoTokenizer.from_pretrained(str(p), trust_remote_code=TRUST_REMOTE_CODE, **kwargs)


def parity(sp_model, hf_tokenizer, texts: Iterable[str], *, examples: int = 3) -> dict:
    """Compare sentencepiece and an HF tokenizer line by line (without special tokens, and once with
    BOS on the first line). Returns {"lines", "differ", "examples": [{"text", "sp", "hf"}...],
    "bos_ok"}."""
    sp = _spm.processor(sp_model)
    texts = list(texts)
    sp_ids = sp.encode(texts)
    hf_ids = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    differ, ex = 0, []
    for t, a, b in zip(texts, sp_ids, hf_ids):
        if list(a) != list(b):
            differ += 1
            if len(ex) < examples:
                ex.append({"text": t, "sp": sp.id_to_piece(list(a)),
                           "hf": hf_tokenizer.convert_ids_to_tokens(list(b))})
    bos_ok = None
    if texts and sp.bos_id() >= 0:
        bos_ok = hf_tokenizer(texts[0])["input_ids"] == [sp.bos_id()] + list(sp_ids[0])
    return {"lines": len(texts), "differ": differ, "examples": ex, "bos_ok": bos_ok}
