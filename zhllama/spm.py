"""SentencePiece helpers shared by the vocabulary stage (train, merge, report) and by tokenizer loading.

- What counts as CJK (`is_cjk_char`, `has_cjk`): one definition for the merge filter, the report and
  the tests, so that "text with no CJK character" means the same thing everywhere.
- Finding and loading a model (`sp_model_path`, `find_sp_model`, `load_proto`): a `.model` file, raw
  bytes, a `ModelProto`, or a Hugging Face tokenizer directory holding `tokenizer.model` (including old
  checkpoints whose `tokenizer_config.json` names `LLaMATokenizer`). Anything that is not a SentencePiece model is a
  one-line `InputError` naming the file.
- Reachability (`unreachable_pieces`): a piece is reachable when encoding its own text, alone, yields
  exactly that piece.
"""

from pathlib import Path
from typing import Iterable, List, Optional

from zhllama.errors import InputError

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user_defined",
              UNUSED: "unused", BYTE: "byte"}
# trainer_spec.model_type
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}

SPACE = "\u2581"  # the sentencepiece whitespace symbol

# CJK, defined broadly: every block whose characters are written in Chinese, Japanese or Korean text,
# including their punctuation and the fullwidth/halfwidth forms. A piece containing any of these is a
# "CJK piece"; text without any of them is left untouched by the merge.
CJK_RANGES = (
    (0x1100, 0x11FF),    # Hangul Jamo
    (0x2E80, 0x2EFF),    # CJK Radicals Supplement
    (0x2F00, 0x2FDF),    # Kangxi Radicals
    (0x2FF0, 0x2FFF),    # Ideographic Description Characters
    (0x3000, 0x303F),    # CJK Symbols and Punctuation (、。《》「」…)
    (0x3040, 0x309F),    # Hiragana
    (0x30A0, 0x30FF),    # Katakana
    (0x3100, 0x312F),    # Bopomofo
    (0x3130, 0x318F),    # Hangul Compatibility Jamo
    (0x3190, 0x319F),    # Kanbun
    (0x31A0, 0x31BF),    # Bopomofo Extended
    (0x31C0, 0x31EF),    # CJK Strokes
    (0x31F0, 0x31FF),    # Katakana Phonetic Extensions
    (0x3200, 0x32FF),    # Enclosed CJK Letters and Months
    (0x3300, 0x33FF),    # CJK Compatibility
    (0x3400, 0x4DBF),    # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),    # CJK Unified Ideographs
    (0xA960, 0xA97F),    # Hangul Jamo Extended-A
    (0xAC00, 0xD7AF),    # Hangul Syllables
    (0xD7B0, 0xD7FF),    # Hangul Jamo Extended-B
    (0xF900, 0xFAFF),    # CJK Compatibility Ideographs
    (0xFE10, 0xFE1F),    # Vertical Forms
    (0xFE30, 0xFE4F),    # CJK Compatibility Forms
    (0xFE50, 0xFE6F),    # Small Form Variants
    (0xFF00, 0xFFEF),    # Halfwidth and Fullwidth Forms (，！？（）ＡＢ１２…)
    (0x1AFF0, 0x1B16F),  # Kana Extended/Supplement
    (0x1F200, 0x1F2FF),  # Enclosed Ideographic Supplement
    (0x20000, 0x3FFFF),  # CJK Unified Ideographs Extensions B.. and Compatibility Supplement
)
_CJK_LO = min(lo for lo, _ in CJK_RANGES)


def is_cjk_char(ch: str) -> bool:
    """True for one character in `CJK_RANGES` (ideographs, kana, hangul, CJK punctuation, fullwidth forms)."""
    o = ord(ch)
    if o < _CJK_LO:
        return False
    for lo, hi in CJK_RANGES:
        if o < lo:
            return False
        if o <= hi:
            return True
    return False


def has_cjk(text: str) -> bool:
    """True when `text` holds at least one CJK character (see `CJK_RANGES`)."""
    return any(is_cjk_char(c) for c in text)


def count_cjk(text: str) -> int:
    return sum(1 for c in text if is_cjk_char(c))


# ----------------------------------------------------------------------------------------------------
# Loading

def model_pb2():
    """The generated protobuf module of sentencepiece_model.proto (shipped with sentencepiece)."""
    from sentencepiece import sentencepiece_model_pb2
    return sentencepiece_model_pb2


def new_proto():
    return model_pb2().ModelProto()


SP_MODEL_NAME = "tokenizer.model"  # the SentencePiece model's name in a Hugging Face tokenizer directory


def find_sp_model(path) -> Optional[Path]:
    """The SentencePiece model behind `path`, or None: `path` itself when it is a file; in a directory its
    `tokenizer.model` (HF tokenizer dirs and checkpoints, old `LLaMATokenizer` ones included), else its only
    `*.model` file (the output of `zhllama vocab train`). The one rule every stage uses."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        cand = p / SP_MODEL_NAME
        if cand.is_file():
            return cand
        models = sorted(x for x in p.glob("*.model") if x.is_file())
        if len(models) == 1:
            return models[0]
    return None


def sp_model_path(path) -> Path:
    """`find_sp_model`, or an `InputError` naming `path` when it holds no SentencePiece model."""
    found = find_sp_model(path)
    if found is not None:
        return found
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such tokenizer (no such file or directory)")
    hint = ("; it has a tokenizer.json, but this needs the SentencePiece model"
            if (p / "tokenizer.json").is_file() else "; a SentencePiece model is needed")
    raise InputError(p, f"no {SP_MODEL_NAME} in this directory{hint}")


def load_proto(src, what: str = "tokenizer"):
    """A `ModelProto` from a path (file or HF dir), bytes, or a `ModelProto` (copied).

    Refuses, with one line naming the file, anything that is not a SentencePiece model: an empty or
    text file, a protobuf of another kind, a model sentencepiece itself cannot load.
    """
    pb = model_pb2()
    if isinstance(src, pb.ModelProto):
        m = pb.ModelProto()
        m.CopyFrom(src)
        return m
    if isinstance(src, (bytes, bytearray)):
        data, name = bytes(src), f"<{what} bytes>"
    else:
        path = sp_model_path(src)
        name = str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if not data:
        raise InputError(name, f"file is empty, not a SentencePiece model ({what})")
    m = pb.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:  # google.protobuf.message.DecodeError and friends
        raise InputError(name, f"not a SentencePiece model ({what}): the file does not parse as a "
                               "sentencepiece ModelProto") from None
    if len(m.pieces) == 0:
        raise InputError(name, f"not a SentencePiece model ({what}): it holds no pieces")
    import sentencepiece as spm
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(name, f"not a valid SentencePiece model ({what}): {first}") from None
    return m


def processor(proto, add_dummy_prefix: Optional[bool] = None):
    """A `SentencePieceProcessor` for `proto`, optionally with `add_dummy_prefix` overridden."""
    import sentencepiece as spm
    m = load_proto(proto)
    if add_dummy_prefix is not None:
        m.normalizer_spec.add_dummy_prefix = bool(add_dummy_prefix)
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def model_type_name(proto) -> str:
    return MODEL_TYPE_NAMES.get(proto.trainer_spec.model_type, str(proto.trainer_spec.model_type))


def piece_text(piece: str) -> str:
    """The surface text of a piece (the whitespace symbol back to a space)."""
    return piece.replace(SPACE, " ")


def unreachable_pieces(proto, ids: Optional[Iterable[int]] = None) -> List[int]:
    """Ids among `ids` (default: every normal piece) whose own text, encoded alone, is not that piece.

    The text is encoded without the dummy prefix (so "中国" is checked as "中国" and "▁中国" as " 中国"),
    with the model's own normalizer otherwise. A piece no input can produce is dead weight: its
    embedding row is never trained.
    """
    sp = processor(proto, add_dummy_prefix=False)
    if ids is None:
        ids = [i for i, p in enumerate(proto.pieces) if p.type == NORMAL]
    ids = list(ids)
    if not ids:
        return []
    texts = [piece_text(proto.pieces[i].piece) for i in ids]
    out = []
    for i, enc in zip(ids, sp.encode(texts)):
        if enc != [i]:
            out.append(i)
    return out


def common_prefix_size(a, b) -> int:
    """How many leading pieces two models share (same piece string at the same id)."""
    n = min(len(a.pieces), len(b.pieces))
    for i in range(n):
        if a.pieces[i].piece != b.pieces[i].piece:
            return i
    return n


def describe(proto) -> dict:
    """A short summary of a model for reports."""
    from collections import Counter
    types = Counter(TYPE_NAMES.get(p.type, str(p.type)) for p in proto.pieces)
    return {"pieces": len(proto.pieces), "model_type": model_type_name(proto),
            "byte_fallback": bool(proto.trainer_spec.byte_fallback),
            "normalizer": proto.normalizer_spec.name or "",
            "add_dummy_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "remove_extra_whitespaces": bool(proto.normalizer_spec.remove_extra_whitespaces),
            "types": dict(types)}


def special_piece(proto, kind: str, default: str) -> str:
    """The piece string of unk/bos/eos/pad from the trainer spec, or `default`."""
    ts = proto.trainer_spec
    idx = {"unk": ts.unk_id, "bos": ts.bos_id, "eos": ts.eos_id, "pad": ts.pad_id}[kind]
    if 0 <= idx < len(proto.pieces):
        return proto.pieces[idx].piece
    return default
