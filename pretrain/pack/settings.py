"""What a pack is keyed by: the tokenizer (its files' fingerprint, BOS/EOS) and the options that change
the output bytes. The same settings and the same inputs give the same pack, and resume only reuses
units packed under equal settings."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from zhllama import bpe
from zhllama.bpe import is_bpe_json_base
from zhllama.errors import UserError
from zhllama.spm import sp_model_path

from .. import shards as fmt


@dataclass
class Tokenizer:
    """The tokenizer a pack is made with: the file the workers load, its fingerprint and BOS/EOS."""
    path: str
    model_file: Path
    fingerprint: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    kind: str = "sentencepiece"   # or "tokenizers" (a tokenizer.json)


def load_json_tokenizer(path) -> Tokenizer:
    """A `tokenizer.json` tokenizer (byte-level BPE bases). BOS/EOS are the tokenizer's own, as
    transformers reads them (tokenizer_config.json bos_token/eos_token, else the post-processor's
    template); a base without BOS (GPT-2 style) packs documents as ids + EOS."""
    tok = bpe.load_tokenizer(path)
    bos, eos = bpe.special_ids(path, tok)
    if eos is None:
        raise UserError(f"{path}: the tokenizer defines no EOS token (eos_token in tokenizer_config.json); "
                        "pretraining blocks need one between documents")
    return Tokenizer(str(path), bpe.tokenizer_json_path(path), fmt.tokenizer_fingerprint(path),
                     tok.get_vocab_size(with_added_tokens=True), bos, eos, kind="tokenizers")


def load_tokenizer(path) -> Tokenizer:
    if is_bpe_json_base(path):
        return load_json_tokenizer(path)
    model_file = sp_model_path(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model_file))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{model_file}: not a loadable SentencePiece model ({e})") from None
    bos, eos = sp.bos_id(), sp.eos_id()
    if bos < 0 or eos < 0:
        raise UserError(f"{model_file}: the model has no BOS/EOS piece (bos_id={bos}, eos_id={eos}); "
                        "pretraining blocks need both")
    return Tokenizer(str(path), model_file, fmt.tokenizer_fingerprint(path), sp.GetPieceSize(),
                     bos, eos)


def make_settings(args, tok: Tokenizer) -> dict:
    """Everything that changes the bytes of the output. Same settings + same inputs = same pack."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "tokenizer_fingerprint": tok.fingerprint,
        "block_size": args.block_size,
        "dtype": fmt.dtype_for_vocab(tok.vocab_size).str,
        "text_field": args.text_field,
        "doc_sep": args.doc_sep,
        "strict": bool(args.strict),
        "validation_ratio": args.validation_ratio,
        "unit_bytes": mb_to_bytes(args.unit_mb),
        "document": "bos+ids+eos",
        "validation_hash": "blake2b-64(utf8 text) < ratio * 2^64",
    } | ({} if tok.kind == "sentencepiece" else {   # SentencePiece packs keep their settings (resume keys)
        "tokenizer_kind": tok.kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "document": "bos+ids+eos" if tok.bos_id is not None else "ids+eos"}) | (
        {"layout": "documents-whole"} if getattr(args, "keep_documents", False) else {})   # --keep-documents


def mb_to_bytes(x: float) -> int:
    """--unit-mb / --slice-mb in bytes (at least one)."""
    return max(1, int(x * 1_000_000))


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
