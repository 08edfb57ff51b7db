"""Byte-level BPE helpers (the `tokenizer.json` of LLaMA-3.x, SmolLM2, Mistral-NeMo, GPT-2).

Shared by `vocab train/merge/report/resize` and `data pack` for bases that ship a Hugging Face
`tokenizer.json` instead of a SentencePiece `tokenizer.model`.

- A byte-level token is a string over a 256-character alphabet, one character per byte (GPT-2's
  printable remapping: "Ġ" is the space byte). `token_bytes` turns it back into the bytes it stands for.
- `is_cjk_safe`: can these bytes occur inside valid UTF-8 text without a CJK character? If not, a BPE
  merge that produces them can never fire on CJK-free text, which is what keeps such text tokenized
  exactly as by the base.
- `special_ids`: BOS/EOS as the tokenizer itself defines them (tokenizer_config.json, else the
  post-processor template).
"""

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from zhllama.errors import InputError, UserError
from zhllama.spm import CJK_RANGES, find_sp_model, is_cjk_char

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


# ----------------------------------------------------------------------------------------------------
# Files

def tokenizer_json_path(path) -> Optional[Path]:
    """`path` itself when it is a tokenizer.json file, `path/tokenizer.json` for a directory, else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return p
    if p.is_dir() and (p / TOKENIZER_JSON).is_file():
        return p / TOKENIZER_JSON
    return None


def is_bpe_json_base(path) -> bool:
    """True for a tokenizer.json (or a directory holding one and no SentencePiece tokenizer.model)."""
    p = Path(path)
    if p.is_dir() and find_sp_model(p) is not None:
        return False
    return tokenizer_json_path(p) is not None


def read_tokenizer_json(path) -> dict:
    """The parsed tokenizer.json behind `path` (file or directory); one-line errors naming the file."""
    f = tokenizer_json_path(path)
    if f is None:
        raise UserError(f"{path}: no tokenizer.json (give a tokenizer.json file or a directory holding one)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f, f"not a JSON tokenizer file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f, "not a tokenizers file (no 'model' object)")
    return data


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or directory."""
    from tokenizers import Tokenizer
    f = tokenizer_json_path(path)
    if f is None:
        raise UserError(f"{path}: no tokenizer.json (give a tokenizer.json file or a directory holding one)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust side raises plain Exception
        raise InputError(f, f"cannot load with tokenizers: {str(e).splitlines()[0] if str(e) else e}") from None


def check_byte_level_bpe(data: dict, where) -> None:
    """A byte-level BPE tokenizer.json, or a one-line error saying what it is instead."""
    model = data["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{where}: the tokenizer model is {model.get('type')!r}; this path handles "
                        f"byte-level BPE tokenizers (LLaMA-3, SmolLM2, Mistral-NeMo) only")
    if not _mentions(data.get("pre_tokenizer"), "ByteLevel") and not _mentions(data.get("decoder"), "ByteLevel"):
        raise UserError(f"{where}: a BPE tokenizer without a ByteLevel pre-tokenizer or decoder (a "
                        f"SentencePiece-style tokenizer.json?); for LLaMA-1/2 and Mistral bases pass "
                        f"the directory holding tokenizer.model")


def _mentions(node, type_name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def merges_as_pairs(merges) -> List[Tuple[str, str]]:
    """tokenizer.json merges, in either format ("a b" strings, or [a, b] lists since tokenizers 0.20)."""
    out = []
    for m in merges:
        if isinstance(m, str):
            a, b = m.split(" ", 1)
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def all_ids(data: dict) -> Dict[str, int]:
    """Every token -> id: the model vocabulary and the added (special) tokens."""
    ids = dict(data["model"]["vocab"])
    for t in data.get("added_tokens") or []:
        ids[t["content"]] = int(t["id"])
    return ids


# ----------------------------------------------------------------------------------------------------
# Byte-level alphabet

@lru_cache(maxsize=1)
def byte_alphabet() -> Tuple[Dict[int, str], Dict[str, int]]:
    """GPT-2's byte <-> printable character map: printable Latin-1 bytes map to themselves, the
    other 68 bytes to U+0100 upwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    to_char, extra = {}, 0
    for b in range(256):
        if b in keep:
            to_char[b] = chr(b)
        else:
            to_char[b] = chr(256 + extra)
            extra += 1
    return to_char, {c: b for b, c in to_char.items()}


def token_bytes(token: str) -> Optional[bytes]:
    """The bytes a byte-level token stands for, or None when it is not over the byte alphabet."""
    _, to_byte = byte_alphabet()
    try:
        return bytes(to_byte[c] for c in token)
    except KeyError:
        return None


def bytes_token(data: bytes) -> str:
    to_char, _ = byte_alphabet()
    return "".join(to_char[b] for b in data)


# ----------------------------------------------------------------------------------------------------
# CJK safety of a byte string

def _seq_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte or an invalid lead


def split_utf8(data: bytes) -> Optional[Tuple[str, bytes]]:
    """(text, tail): `data` as complete UTF-8 characters followed by one incomplete character's first
    bytes (possibly none). None when `data` starts inside a character or is not UTF-8."""
    i = 0
    while i < len(data):
        n = _seq_len(data[i])
        if n == 0:
            return None
        if i + n > len(data):
            tail = data[i:]
            if any(not 0x80 <= b <= 0xBF for b in tail[1:]):
                return None
            try:
                return data[:i].decode("utf-8"), tail
            except UnicodeDecodeError:
                return None
        i += n
    try:
        return data.decode("utf-8"), b""
    except UnicodeDecodeError:
        return None


def completions(tail: bytes, limit: int = 1 << 12):
    """Every character whose UTF-8 encoding starts with `tail` (an incomplete character), in code point
    order, at most `limit` of them."""
    need = _seq_len(tail[0]) - len(tail)
    out = []
    for k in range(64 ** need):
        rest = bytes(0x80 | ((k >> (6 * (need - 1 - j))) & 0x3F) for j in range(need))
        try:
            out.append((tail + rest).decode("utf-8"))
        except UnicodeDecodeError:
            continue  # overlong / surrogate: not a character
        if len(out) >= limit:
            break
    return out


def _tail_is_cjk(tail: bytes) -> bool:
    """Every character starting with these bytes is CJK (checked over its code point range)."""
    need = _seq_len(tail[0]) - len(tail)
    first = tail + bytes([0x80] * need)
    last = tail + bytes([0xBF] * need)
    try:
        a, b = ord(first.decode("utf-8")), ord(last.decode("utf-8"))
    except (UnicodeDecodeError, TypeError):
        return False
    return any(lo <= a and b <= hi for lo, hi in CJK_RANGES)


def is_cjk_safe(data: bytes) -> bool:
    """True when `data` can only occur in UTF-8 text that contains a CJK character: it is complete
    characters (at least one CJK), or complete characters and the first bytes of one whose every
    completion is CJK. Bytes starting mid-character never are (their character is unknown)."""
    parts = split_utf8(data)
    if parts is None:
        return False
    text, tail = parts
    if any(is_cjk_char(c) for c in text):
        return True
    return bool(tail) and _tail_is_cjk(tail)


# ----------------------------------------------------------------------------------------------------
# BOS / EOS

def _token_text(v) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def special_ids(path, tokenizer=None) -> Tuple[Optional[int], Optional[int]]:
    """(bos_id, eos_id) of a tokenizer.json tokenizer.

    From `tokenizer_config.json` beside it (bos_token / eos_token), as transformers reads them. Without
    one: BOS is the single special token the post-processor puts before the text (LLaMA-3's
    TemplateProcessing), EOS the one it puts after. Either may be None (GPT-2-style bases have no BOS).
    """
    p = Path(path)
    tok = tokenizer or load_tokenizer(p)
    d = p if p.is_dir() else p.parent
    cfg_file = d / TOKENIZER_CONFIG
    bos = eos = None
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InputError(cfg_file, f"not valid JSON: {e}") from None
        for key in ("bos_token", "eos_token"):
            text = _token_text(cfg.get(key))
            if text is None:
                continue
            i = tok.token_to_id(text)
            if i is None:
                raise InputError(cfg_file, f"{key} {text!r} is not a token of {tokenizer_json_path(p)}")
            if key == "bos_token":
                bos = i
            else:
                eos = i
        return bos, eos
    post = json.loads(tok.to_str()).get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        ids = {k: v["ids"][0] for k, v in (post.get("special_tokens") or {}).items() if v.get("ids")}
        seq_at = next((k for k, x in enumerate(single) if "Sequence" in x), None)
        if seq_at is not None:
            before = [x["SpecialToken"]["id"] for x in single[:seq_at] if "SpecialToken" in x]
            after = [x["SpecialToken"]["id"] for x in single[seq_at + 1:] if "SpecialToken" in x]
            bos = ids.get(before[-1]) if before else None
            eos = ids.get(after[0]) if after else None
    return bos, eos
