"""Convert SFT data files to normalised JSON lines.

    python -m zhllama.sft.convert ../shared/data/sft/belle_eval_set_zh.json \\
        --field-map instruction=question,output=std_answer --out data/sft/belle_zh.jsonl

Reads any input `zhllama.sft.records` accepts (Alpaca JSON array or lines, ShareGPT/OpenAI-style
conversations, parquet/Arrow files and `save_to_disk` folders one record a row, `hf://` Hub datasets,
other field names through --field-map, `path:weight` specs) with the same validation, and writes the
valid records: single-turn ones as Alpaca objects (`instruction`, `input`, `output`,
plus `system` when set), multi-turn ones as `conversations` (`from`/`value`). Output is written
atomically; skipped records are counted in the log (or stop the run with --strict).
"""

import argparse
import json
import sys

from zhllama.argtypes import SEED
from zhllama.errors import UserError, disk_full_error
from zhllama.fsutil import atomic_write_text
from zhllama.inputfile import add_max_line_argument, max_line_bytes
from zhllama.log import get_logger, setup_logging
from zhllama.outlock import output_lock

from .records import MAX_RECORD_BYTES, MAX_RECORD_MB, Record, load_records

log = get_logger("zhllama.sft.convert")


def record_to_json(record: Record) -> dict:
    """The normalised JSON object of a record (what `load_records` reads back unchanged)."""
    if len(record.turns) == 1:
        out = {"instruction": record.turns[0].user, "input": record.input,
               "output": record.turns[0].assistant}
    else:
        conv = [{"from": "system", "value": record.system}] if record.system is not None else []
        for t in record.turns:
            conv += [{"from": "human", "value": t.user}, {"from": "gpt", "value": t.assistant}]
        return {"conversations": conv}
    if record.system is not None:
        out["system"] = record.system
    return out


def convert(specs, out, *, field_map=None, strict=False, seed=0, max_record=MAX_RECORD_BYTES) -> dict:
    """Write the valid records of `specs` to `out` as JSON lines; returns the stats as a dict."""
    with output_lock(out, "zhllama.sft.convert", "output file"):   # checks `out` before reading
        records, stats = load_records(specs, field_map=field_map, strict=strict, seed=seed,
                                      max_record=max_record)
        text = "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(out, text)
    log.info("wrote %d records to %s", len(records), out)
    return stats.as_dict()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhllama.sft.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="data files (JSON, JSON lines, parquet, Arrow), dirs, globs, "
                                             "save_to_disk folders, hf://OWNER/NAME; path:weight to resample")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--field-map", default=None,
                   help="other field names, e.g. instruction=question,output=std_answer")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--seed", type=SEED, default=0, help="seed for fractional weights")
    add_max_line_argument(p, "record (a JSON line or array element; a longer one is a bad record: "
                             "skipped, or an error with --strict)", "--max-record-mb", MAX_RECORD_MB)
    args = p.parse_args(argv)
    setup_logging()
    try:
        convert(args.inputs, args.out, field_map=args.field_map, strict=args.strict, seed=args.seed,
                max_record=max_line_bytes(args, "max_record_mb"))
    except UserError as e:
        print(f"zhllama.sft.convert: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = disk_full_error(e, args.out)
        if full is None:
            raise
        print(f"zhllama.sft.convert: error: {full}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
