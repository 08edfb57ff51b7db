"""Instruction records: read, validate and normalise SFT data files.

Accepted files (.json, .jsonl, .ndjson, optionally .gz): a JSON array of objects (Stanford's
alpaca_data.json) or JSON lines, told apart by the first non-blank character. Also tables, one record
a row (`iter_table`): parquet and Arrow files, a dataset saved with `save_to_disk` (its `train` split;
give a DatasetDict's split folder for another), and a Hub dataset `hf://OWNER/NAME[/CONFIG]`
(streamed; needs the network). Accepted records:

- Alpaca: `instruction`, optional `input`, `output` (and an optional `system`);
- conversations (ShareGPT style): `conversations` (or `messages`), a list of `{from|role, value|content}`
  with roles human/user, gpt/assistant, and an optional leading system message;
- other field names through `field_map` ({canonical: name in the file}, e.g.
  `{"instruction": "question", "output": "std_answer"}`); a canonical name still works where the
  mapped one is absent, so mapped and plain files can be mixed.

Every record becomes a `Record` (system, input, turns). A bad record (not UTF-8, not JSON, not an
object, a missing or empty field, a wrong type, a broken conversation, an array cut short) is
reported with its file and line (a table's row, from 0): `strict=True` raises `InputError`, otherwise it is counted by
reason and skipped, and the first few messages are kept in `RecordStats` (and logged). A record
larger than `max_record` bytes (2 MB by default: a 25 MB record took 3.6 GB to tokenize) is such a bad
record ("too_large"): it is never parsed or tokenized. A FIFO, device or broken link is refused, and a
UTF-8 BOM at the start of a file is skipped (`zhllama.inputfile`).
"""

import bisect
import gzip
import json
import math
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from zhllama.columnar import iter_rows
from zhllama.corpus import expand_sources, is_columnar, parse_weighted_spec
from zhllama.errors import ConfigError, InputError
from zhllama.hfdatasets import HubDataset, iter_hub_rows, resolve
from zhllama.inputfile import BOM, check_input_file
from zhllama.log import get_logger

log = get_logger("zhllama.sft.records")

CANONICAL_FIELDS = ("instruction", "input", "output", "system", "conversations")
RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson")
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bot", "model"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by surrogateescape
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a "\ud800" escape in the JSON: not a character
MAX_RECORD_MB = 2.0
MAX_RECORD_BYTES = int(MAX_RECORD_MB * 1_000_000)


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Record:
    """One training example in conversation form. `input` belongs to the first user turn (Alpaca's
    "### Input:"); `system` is None when the record has none (the template's default applies)."""
    turns: List[Turn]
    system: Optional[str] = None
    input: str = ""
    source: str = ""  # "file:line", for messages

    def messages(self) -> List[Dict[str, str]]:
        out = []
        for t in self.turns:
            out.append({"role": "user", "content": t.user})
            out.append({"role": "assistant", "content": t.assistant})
        return out


@dataclass
class RecordStats:
    """What was read: records kept per file, records skipped per reason, the first problems."""
    files: List[str] = field(default_factory=list)
    read: Counter = field(default_factory=Counter)      # valid records per file
    sampled: Counter = field(default_factory=Counter)   # records per file after weighting
    skipped: Counter = field(default_factory=Counter)   # reason -> count
    first_problems: List[str] = field(default_factory=list)
    max_problems: int = 5
    # filled by SFTDataset once records are tokenized
    dropped: Counter = field(default_factory=Counter)   # reason -> examples dropped
    first_dropped: List[str] = field(default_factory=list)
    truncated: int = 0
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def note(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_problems) < self.max_problems:
            self.first_problems.append(message)

    def drop(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        if len(self.first_dropped) < self.max_problems:
            self.first_dropped.append(message)

    def as_dict(self) -> dict:
        return {"files": list(self.files), "read": dict(self.read), "sampled": dict(self.sampled),
                "skipped": dict(self.skipped), "first_problems": list(self.first_problems),
                "dropped": dict(self.dropped), "first_dropped": list(self.first_dropped),
                "truncated": self.truncated, "examples": self.examples, "sequences": self.sequences,
                "tokens": self.tokens, "trained_tokens": self.trained_tokens}

    def log_summary(self, logger=None) -> None:
        logger = logger or log
        for f in self.files:
            logger.info("sft records: %s: %d valid, %d after weighting", f, self.read[f], self.sampled[f])
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            logger.warning("sft records: skipped %d bad records (%s)", self.total_skipped, reasons)
            for msg in self.first_problems:
                logger.warning("  %s", msg)

    def log_examples(self, logger=None) -> None:
        logger = logger or log
        if self.examples:
            share = self.trained_tokens / max(self.tokens, 1)
            logger.info("sft examples: %d (%d sequences), %d tokens, %.1f%% trained, %d truncated",
                        self.examples, self.sequences, self.tokens, 100 * share, self.truncated)
        if self.dropped:
            logger.warning("sft examples: dropped %d with no response token within max_length",
                           sum(self.dropped.values()))
            for msg in self.first_dropped:
                logger.warning("  %s", msg)


class BadRecord(Exception):
    """A record that fails validation; `reason` is the stats key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- field mapping -----------------------------------------------------------------------------
def parse_field_map(field_map) -> Dict[str, str]:
    """{canonical: source} from a dict or a "instruction=question,output=std_answer" string.

    Either direction is accepted: {"instruction": "question"} and {"question": "instruction"} mean
    the same (keys are read as the canonical names when they all are, else the values must be)."""
    if field_map is None or field_map == "":
        return {}
    if isinstance(field_map, str):
        pairs = {}
        for item in field_map.split(","):
            if "=" not in item:
                raise ConfigError(f"field map item '{item}' must look like canonical=source "
                                  "(e.g. instruction=question,output=std_answer)")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        field_map = pairs
    if not isinstance(field_map, dict):
        raise ConfigError(f"field map must be a mapping, not {type(field_map).__name__}")
    for k, v in field_map.items():
        if not isinstance(k, str) or not k or not isinstance(v, str) or not v:
            raise ConfigError(f"field map entry {k!r}: {v!r} must map a field name to a field name")
    if all(k in CANONICAL_FIELDS for k in field_map):
        return dict(field_map)
    if all(v in CANONICAL_FIELDS for v in field_map.values()):
        inverted = {v: k for k, v in field_map.items()}
        if len(inverted) != len(field_map):
            raise ConfigError(f"field map {field_map} maps two fields to the same name")
        return inverted
    bad = [k for k in field_map if k not in CANONICAL_FIELDS]
    raise ConfigError(f"field map: '{bad[0]}' is not one of {', '.join(CANONICAL_FIELDS)} "
                      "(write canonical=source, e.g. instruction=question,output=std_answer)")


def _get(obj: dict, name: str, field_map: Dict[str, str]):
    """(found, value, name used) for a canonical field."""
    mapped = field_map.get(name)
    if mapped is not None and mapped in obj:
        return True, obj[mapped], mapped
    if name in obj:
        return True, obj[name], name
    return False, None, mapped or name


# -- validation ---------------------------------------------------------------------------------
def normalise(obj, field_map: Optional[Dict[str, str]] = None) -> Record:
    """A validated `Record` from one JSON value, or `BadRecord` saying what is wrong."""
    field_map = field_map or {}
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"record is a JSON {_json_type(obj)}, not an object")
    try:
        _check_strings(obj)
    except RecursionError:
        raise BadRecord("bad_json", _TOO_DEEP) from None
    has_conv, conv, conv_name = _get(obj, "conversations", field_map)
    if not has_conv and "messages" in obj and "conversations" not in field_map:
        has_conv, conv, conv_name = True, obj["messages"], "messages"
    system = _optional_str(obj, "system", field_map)
    if has_conv:
        return _conversation(conv, conv_name, system)

    has_ins, instruction, ins_name = _get(obj, "instruction", field_map)
    has_out, output, out_name = _get(obj, "output", field_map)
    if not has_ins or not has_out:
        missing = [n for ok, n in ((has_ins, ins_name), (has_out, out_name)) if not ok]
        hint = "" if field_map else " (map other names with --field-map, e.g. instruction=question)"
        raise BadRecord("missing_field", f"missing field {', '.join(repr(m) for m in missing)} "
                                         f"(fields: {', '.join(sorted(obj)) or 'none'}){hint}")
    _expect_str(instruction, ins_name)
    _expect_str(output, out_name)
    inp = _optional_str(obj, "input", field_map) or ""
    if not instruction.strip():
        raise BadRecord("empty_field", f"field '{ins_name}' is empty")
    if not output.strip():
        raise BadRecord("empty_field", f"field '{out_name}' is empty: nothing to train on")
    return Record(turns=[Turn(instruction, output)], system=system, input=inp)


def _conversation(conv, name: str, system: Optional[str]) -> Record:
    if not isinstance(conv, list):
        raise BadRecord("wrong_type", f"field '{name}' is a JSON {_json_type(conv)}, not a list")
    messages = []
    for i, m in enumerate(conv):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"{where} is a JSON {_json_type(m)}, not an object")
        role = m.get("from", m.get("role"))
        content = m.get("value", m.get("content"))
        if role is None or content is None:
            raise BadRecord("missing_field", f"{where} needs 'from' (or 'role') and 'value' (or 'content')")
        if not isinstance(role, str):
            raise BadRecord("wrong_type", f"{where} role is a JSON {_json_type(role)}, not a string")
        _expect_str(content, f"{where} content")
        role = role.lower()
        if role == "system":
            if i != 0:
                raise BadRecord("bad_conversation", f"{where}: a system message may only come first")
            system = content
            continue
        if role in USER_ROLES:
            messages.append(("user", content, where))
        elif role in ASSISTANT_ROLES:
            messages.append(("assistant", content, where))
        else:
            raise BadRecord("bad_conversation", f"{where}: unknown role '{role}' "
                                                "(human/user, gpt/assistant or system)")
    # A trailing user message has no response to learn from; ShareGPT dumps often end that way.
    if messages and messages[-1][0] == "user" and len(messages) > 1:
        messages.pop()
    if not messages:
        raise BadRecord("bad_conversation", f"field '{name}' holds no user/assistant message")
    turns = []
    for i in range(0, len(messages), 2):
        user = messages[i]
        if user[0] != "user":
            raise BadRecord("bad_conversation", f"{user[2]}: expected a user message here "
                                                "(turns must alternate user, assistant)")
        if i + 1 >= len(messages):
            raise BadRecord("bad_conversation", f"{user[2]}: the user message has no assistant response")
        bot = messages[i + 1]
        if bot[0] != "assistant":
            raise BadRecord("bad_conversation", f"{bot[2]}: expected an assistant message here "
                                                "(turns must alternate user, assistant)")
        if not user[1].strip():
            raise BadRecord("empty_field", f"{user[2]}: empty user message")
        if not bot[1].strip():
            raise BadRecord("empty_field", f"{bot[2]}: empty assistant response")
        turns.append(Turn(user[1], bot[1]))
    return Record(turns=turns, system=system)


def _optional_str(obj, name, field_map) -> Optional[str]:
    found, value, used = _get(obj, name, field_map)
    if not found or value is None:
        return None
    _expect_str(value, used)
    return value


def _expect_str(value, name):
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field '{name}' is a JSON {_json_type(value)}, not a string")


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_strings(obj, path="") -> None:
    """Bytes that were not UTF-8 survive decoding as lone surrogates; refuse records holding any."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        if m:
            byte = ord(m.group()) - 0xDC00
            raise BadRecord("bad_utf8", f"not valid UTF-8 (byte 0x{byte:02x} in {path or 'a value'}); "
                                        "convert the file to UTF-8 (e.g. iconv -f GBK -t UTF-8)")
        m = _LONE_SURROGATE.search(obj)
        if m:
            raise BadRecord("bad_json", f"lone surrogate escape \\u{ord(m.group()):04x} in {path or 'a value'} "
                                        "(half of a UTF-16 pair, not a character)")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(v, f"field '{k}'")
    elif isinstance(obj, list):
        for v in obj:
            _check_strings(v, path)


# -- reading files -------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    check_input_file(path, "SFT data file")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e or type(e).__name__}); "
                               "re-download or re-compress the file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e}") from None
    raw = raw.removeprefix(BOM)
    if not raw.strip():
        raise InputError(path, "file is empty")
    # surrogateescape keeps undecodable bytes visible per record instead of failing the whole file
    return raw.decode("utf-8", errors="surrogateescape")


def iter_file(path, field_map=None, strict=False, stats: Optional[RecordStats] = None,
              max_record: int = MAX_RECORD_BYTES):
    """Validated `Record`s of one file, in file order; bad ones raise (strict) or are counted."""
    path = Path(path)
    stats = stats if stats is not None else RecordStats()
    field_map = parse_field_map(field_map)
    text = _read_text(path)
    body = text.lstrip()
    values = (_iter_array(path, text, max_record) if body.startswith("[")
              else _iter_lines(path, text, max_record))
    yield from _validated(path, values, field_map, strict, stats)


def iter_table(source, field_map=None, strict=False, stats: Optional[RecordStats] = None,
               max_record: int = MAX_RECORD_BYTES):
    """Validated `Record`s of a parquet/Arrow file or a resolved Hub dataset, one a row, in row order,
    each named `source:row N` (from 0). A null is an absent field; a row larger than `max_record` bytes
    as JSON is a bad record ("too_large"), as a JSON line would be."""
    stats = stats if stats is not None else RecordStats()
    rows = iter_hub_rows(source) if isinstance(source, HubDataset) else iter_rows(source)
    values = ((f"row {row}", _too_large(json.dumps(obj, ensure_ascii=False, default=str), max_record) or obj)
              for row, obj in rows)
    yield from _validated(source, values, parse_field_map(field_map), strict, stats)


def _validated(source, values, field_map, strict, stats):
    """Records of (where, JSON value or BadRecord) pairs, each named `source:where`; a bad one raises
    (strict) or is counted."""
    for where, value in values:
        try:
            if isinstance(value, BadRecord):
                raise value
            record = normalise(value, field_map)
        except BadRecord as e:
            if strict:
                raise InputError(source, str(e), where) from None
            stats.note(e.reason, f"{source}:{where}: {e}")
            continue
        record.source = f"{source}:{where}"
        yield record


_TOO_DEEP = "JSON nested too deeply to read"


def _too_large(text: str, max_record: int) -> Optional[BadRecord]:
    """A BadRecord when `text` (a record as written) is longer than `max_record` bytes in UTF-8."""
    if len(text) * 4 <= max_record or len(text.encode("utf-8", "surrogateescape")) <= max_record:
        return None
    return BadRecord("too_large", f"record longer than {max_record / 1e6:g} MB; split it, or raise the "
                                  "limit with --max-record-mb")


def _iter_lines(path, text, max_record=MAX_RECORD_BYTES):
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        big = _too_large(line, max_record)
        if big is not None:
            yield lineno, big
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord("bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            yield lineno, BadRecord("bad_json", _TOO_DEEP)


def _iter_array(path, text, max_record=MAX_RECORD_BYTES):
    """Elements of a JSON array with the line each starts on. A syntax error or an array cut short
    ends the file there (the parser cannot resynchronise): one problem is reported at its line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # past "["
    line_at = _LineIndex(text)
    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        if pos >= len(text):
            yield line_at(pos), BadRecord("truncated_array", "JSON array cut short: ']' missing at end of file")
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except RecursionError:
            yield line_at(pos), BadRecord("bad_json", _TOO_DEEP + "; the rest of the file is not read")
            return
        except json.JSONDecodeError as e:
            if not text.rstrip().endswith("]"):
                yield line_at(pos), BadRecord(
                    "truncated_array", "JSON array cut short: the file ends inside the record that "
                                       f"starts here ({e.msg}); earlier records are kept")
            else:
                yield e.lineno, BadRecord("bad_json", f"not valid JSON ({e.msg} at column {e.colno}); "
                                                      "the rest of the file is not read")
            return
        big = _too_large(text[pos:end], max_record)
        yield line_at(pos), (value if big is None else big)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            rest = text[pos + 1:].strip()
            if rest:
                yield line_at(pos + 1 + text[pos + 1:].index(rest[0])), BadRecord(
                    "bad_json", "text after the end of the JSON array")
            return
        if pos >= len(text):
            yield line_at(pos), BadRecord("truncated_array", "JSON array cut short: ']' missing at end of file")
            return
        yield line_at(pos), BadRecord("bad_json", f"expected ',' or ']' after a record, found {text[pos]!r}; "
                                                  "the rest of the file is not read")
        return


class _LineIndex:
    """Line number (from 1) of a character offset, by bisecting the newline offsets."""

    def __init__(self, text):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def __call__(self, pos) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1


# -- several files with weights ---------------------------------------------------------------------
def load_records(specs, *, field_map=None, strict=False, weights=None, seed=0,
                 max_record: int = MAX_RECORD_BYTES):
    """Records of several files mixed with weights -> (records, stats).

    `specs`: paths, directories, globs, saved datasets or `hf://` Hub datasets, each optionally
    "path:weight"; or pass `weights` (one per spec). A weight w keeps every record floor(w) times plus a seeded random fraction w - floor(w)
    of them once more (0.5 = half the file, 2 = twice). Order: files in spec order, records in file
    order, extra copies after the file's records; the training sampler shuffles.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ConfigError("no SFT data file given")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} weights for {len(specs)} data specs")
    field_map = parse_field_map(field_map)
    stats = RecordStats()
    rng = random.Random(seed)
    records: List[Record] = []
    for i, spec in enumerate(specs):
        path_spec, weight = parse_weighted_spec(spec)
        if weights is not None:
            if weight is not None:
                raise ConfigError(f"data spec '{spec}' has a weight and weights= gives another")
            weight = float(weights[i])
        weight = 1.0 if weight is None else weight
        for path in expand_sources([path_spec]):
            if isinstance(path, HubDataset):
                path = resolve(path)
                file_records = list(iter_table(path, field_map, strict, stats, max_record))
            elif is_columnar(path):
                file_records = list(iter_table(path, field_map, strict, stats, max_record))
            elif path.name.lower().removesuffix(".gz").endswith(RECORD_SUFFIXES):
                file_records = list(iter_file(path, field_map, strict, stats, max_record))
            else:
                raise InputError(path, f"not an SFT data file (expected {'/'.join(RECORD_SUFFIXES)}, "
                                       ".parquet, .arrow or a saved dataset)")
            name = str(path)
            stats.files.append(name)
            stats.read[name] += len(file_records)
            chosen = _weighted(file_records, weight, rng)
            stats.sampled[name] += len(chosen)
            records.extend(chosen)
    stats.log_summary()
    if not records:
        raise InputError(", ".join(stats.files), "no valid SFT record"
                         + (f" ({stats.total_skipped} skipped: {stats.first_problems[0]})"
                            if stats.first_problems else ""))
    return records, stats


def _weighted(records: Sequence[Record], weight: float, rng: random.Random) -> List[Record]:
    whole = int(math.floor(weight))
    out = list(records) * whole
    extra = round((weight - whole) * len(records))
    if extra:
        keep = sorted(rng.sample(range(len(records)), extra))
        out.extend(records[k] for k in keep)
    return out
