"""Translate instruction data (Alpaca's instruction/input/output records) into Chinese through an
OpenAI-compatible API, keeping every field, resumable.

Each record's non-empty text fields go to the model as one JSON object and must come back as a JSON
object with the same keys (Chinese-alpaca-lora's recipe: translate the 52k Alpaca records with the
same kind of API that generated them). Other keys are copied unchanged. An answer that is not such an
object is asked for again (--parse-retries); a record that still fails is listed in OUT.state.json
and left out of OUT. The output is JSON lines, appended per batch like `zhllama selfinstruct`: a
crash loses at most the batch in flight, and the same command resumes.

example:
  zhllama translate --input alpaca_data.json --out alpaca_data_zh.jsonl \\
      --api-base https://api.openai.com/v1 --model gpt-4o-mini --concurrency 8
"""

import json
import re
from collections import Counter
from pathlib import Path

from zhllama.argtypes import float_range, int_range
from zhllama.corpus import read_json_records
from zhllama.errors import InputError, UserError
from zhllama.fsutil import sha256_file
from zhllama.inputfile import add_max_line_argument, max_line_bytes
from zhllama.log import get_logger
from zhllama.outlock import output_lock
from zhllama.sft.api_client import APIError, add_client_arguments, client_from_args
from zhllama.sft.records import MAX_RECORD_BYTES, MAX_RECORD_MB
from zhllama.sft.selfinstruct import ResumableJsonl, load_prompt

log = get_logger(__name__)

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.I)


def load_records(path, fields, max_record: int = MAX_RECORD_BYTES) -> list:
    """Records from a JSON array (alpaca_data.json) or JSON lines; each must be an object whose
    `fields`, when present, are strings, and at most `max_record` bytes long (a record is one request).
    Errors name the line (JSON lines) or the record number."""
    path = Path(path)
    items = read_json_records(path, "input file", max_record)
    records = []
    for loc, obj in items:
        problem = None
        if not isinstance(obj, dict):
            problem = "expected a JSON object"
        elif any(f in obj and not isinstance(obj[f], str) for f in fields):
            problem = f"field '{next(f for f in fields if f in obj and not isinstance(obj[f], str))}' must be a string"
        elif not any(f in obj for f in fields):
            problem = f"none of the fields {', '.join(fields)} is present"
        if problem:
            raise InputError(path, problem, loc)
        records.append(obj)
    if not records:
        raise InputError(path, "no records in the file")
    return records


def build_request(record: dict, fields, header: str) -> tuple:
    """(prompt, the field values sent). Empty fields are not sent: they stay empty."""
    payload = {f: record[f] for f in fields if isinstance(record.get(f), str) and record[f].strip()}
    return header.rstrip() + "\n" + json.dumps(payload, ensure_ascii=False, indent=1), payload


def parse_translation(text: str, keys) -> dict:
    """The JSON object in a model's answer with exactly `keys`, string values; ValueError otherwise."""
    text = _FENCE.sub("", (text or "").strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the answer")
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in the answer ({e.msg})")
    if not isinstance(obj, dict) or set(obj) != set(keys):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"expected keys {sorted(keys)}, got {got}")
    if not all(isinstance(v, str) and v.strip() for v in obj.values()):
        raise ValueError("a translated field is empty or not a string")
    return obj


def translate_records(records, out, client, *, fields=("instruction", "input", "output"), api="chat",
                      batch_size=16, parse_retries=2, temperature=0.0, max_tokens=2048,
                      fingerprint=None, overwrite=False):
    """Translate `records` into `out` (JSON lines). Returns the state (counts, failed indices)."""
    writer = ResumableJsonl(out)
    done, state = writer.open(dict(fingerprint or {}, fields=list(fields)), overwrite=overwrite)
    if done and "next" not in state:
        raise UserError(f"{out}: exists but has no translation resume state; use another --out or pass "
                        f"--overwrite")
    start = state.get("next", 0)
    counts = Counter(state.get("counts", {}))
    failed = list(state.get("failed", []))
    header = load_prompt("translate_zh.txt")
    if start:
        log.info("resuming at record %d of %d (%d written, %d failed)", start, len(records), len(done), len(failed))

    def one(record):
        prompt, payload = build_request(record, fields, header)
        if not payload:
            return dict(record), "copied"
        last = None
        for _ in range(parse_retries + 1):
            res = client.generate(prompt, api=api, temperature=temperature, max_tokens=max_tokens)
            try:
                return dict(record, **parse_translation(res.text, payload)), "translated"
            except ValueError as e:
                last = e
        raise APIError(f"unusable translation after {parse_retries + 1} answers: {last}", reason="bad_translation")

    for lo in range(start, len(records), batch_size):
        batch = records[lo:lo + batch_size]
        results = client.map(one, batch)
        errors = [r for r in results if isinstance(r, Exception)]
        if len(errors) == len(batch) and all(e.reason != "bad_translation" for e in errors):
            # The endpoint is down or refuses us: stop before marking the batch done.
            raise UserError(f"every request for records {lo}..{lo + len(batch) - 1} failed; first error: "
                            f"{errors[0]}. Records before {lo} are done in {out}; run the same command "
                            f"again to resume" + writer.kept_aside())
        new = []
        for i, res in enumerate(results):
            if isinstance(res, Exception):
                failed.append(lo + i)
                counts["failed_" + res.reason] += 1
            else:
                new.append(res[0])
                counts[res[1]] += 1
        state.update(next=lo + len(batch), counts=dict(counts), failed=failed)
        writer.commit(new, state)
        log.info("records %d/%d | translated %d, copied %d, failed %d | %s", lo + len(batch), len(records),
                 counts["translated"], counts["copied"], len(failed), client.stats_line())
    writer.finish()
    return state


def add_arguments(parser):
    parser.add_argument("--input", required=True, help="instruction data: a JSON array (alpaca_data.json) "
                        "or JSON lines of objects")
    parser.add_argument("--out", required=True, help="output JSON lines (same keys); resumed when it exists")
    add_max_line_argument(parser, "record (a JSON line or array element)", "--max-record-mb", MAX_RECORD_MB)
    add_client_arguments(parser)
    parser.add_argument("--fields", default="instruction,input,output",
                        help="comma-separated fields to translate (default instruction,input,output)")
    parser.add_argument("--batch-size", type=int_range(1, 10 ** 4),
                        default=16, help="records per committed batch (16)")
    parser.add_argument("--parse-retries", type=int_range(0, 100),
                        default=2, help="new answers asked for when an answer "
                        "is not the expected JSON object (2)")
    parser.add_argument("--temperature", type=float_range(0, 2), default=0.0)
    parser.add_argument("--max-tokens", type=int_range(1, 1 << 20), default=2048)
    parser.add_argument("--limit", type=int_range(0, 10 ** 12),
                        default=0, help="translate only the first N records (0 = all)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming --out (the "
                        "old output is kept as OUT.previous until the new run finishes)")


def run(args):
    with output_lock(args.out, "zhllama translate", "output file"):   # it appends: one writer only
        return _run(args)


def _run(args):
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    if not fields:
        raise UserError("--fields is empty")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    records = load_records(args.input, fields, max_line_bytes(args, "max_record_mb"))
    if args.limit:
        records = records[:args.limit]
    client = client_from_args(args)
    state = translate_records(
        records, args.out, client, fields=fields, api=args.api, batch_size=args.batch_size,
        parse_retries=args.parse_retries, temperature=args.temperature, max_tokens=args.max_tokens,
        fingerprint={"input_sha256": sha256_file(args.input)}, overwrite=args.overwrite)
    c = state["counts"]
    failed = state["failed"]
    print(f"{args.out}: {c.get('translated', 0)} translated, {c.get('copied', 0)} copied (nothing to translate), "
          f"{len(failed)} failed" + (f" (record indices in {args.out}.state.json)" if failed else "")
          + f"; {client.stats_line()}")
    return 0
