"""Compare tokenizers on text: compression, reachability, slow/fast parity, changes from a reference.

    zhllama vocab report --tokenizer merged/ --tokenizer other/tokenizer.model \\
        --reference llama/tokenizer.model --text heldout_zh.txt english.txt [--json]

A tokenizer is a sentencepiece `.model` file or a Hugging Face directory holding `tokenizer.model`, or a
byte-level BPE `tokenizer.json` (or a directory with one and no tokenizer.model: LLaMA-3, SmolLM2),
measured by `vocab/bpe_report.py` with the same columns.
Each text line (document, for JSON lines) is classified by `zhllama.spm.has_cjk`:

- zh tokens/char: tokens / characters over lines with a CJK character (no BOS; all characters of the
  line count, punctuation and digits included);
- en tokens/word: tokens / whitespace-separated words over lines without any CJK character;
- byte fallback: share of all tokens that are byte pieces (<0x..>);
- unreachable: pieces whose own text does not encode to them; counted over the pieces added to the
  reference (those after the longest common prefix) when the tokenizer extends it, else over all;
- slow/fast differ: lines where the HF tokenizer differs from sentencepiece (HF directory:
  `AutoTokenizer.from_pretrained`; bare .model: the tokenizer.json `vocab merge` would write; with
  `--hf-loader llama`: transformers' own `LlamaTokenizer` conversion instead);
- vs reference: lines tokenized differently from the reference, over lines without CJK and over all.

`--english-sample N` adds N lines of English prose (docstrings and comments of the Python standard library, always
available, deterministic for a Python version) to the text.
"""

import functools
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List

from zhllama import bpe, corpus, hf_tokenizer as hft, spm as _spm
from zhllama.argtypes import int_range
from zhllama.bpe import is_bpe_json_base, load_tokenizer as load_bpe
from zhllama.errors import UserError
from zhllama.hf_tokenizer import parity as _parity
from zhllama.inputfile import MAX_LINE_BYTES, add_max_line_argument, max_line_bytes
from zhllama.model_config import TRUST_REMOTE_CODE, check_tokenizer_dir

HF_LOADERS = ("auto", "llama")


def add_arguments(parser):
    parser.add_argument("--tokenizer", "-t", action="append", required=True,
                        help="a sentencepiece .model or a HF tokenizer directory (repeat for several)")
    parser.add_argument("--text", nargs="+", action="extend", default=[],
                        help="text files (txt/jsonl/gz), directories or globs to measure on")
    parser.add_argument("--reference", default=None,
                        help="count lines tokenized differently from this tokenizer (e.g. the base LLaMA one)")
    parser.add_argument("--english-sample", type=int_range(0, 10 ** 7), default=0,
                        help="add this many lines of built-in English prose (Python docstrings)")
    parser.add_argument("--max-lines", type=int_range(1, 10 ** 9), default=200_000,
                        help="use at most this many lines per input file, from its start (default 200000)")
    parser.add_argument("--text-field", default="text", help="JSON-lines text field (default text)")
    add_max_line_argument(parser)
    parser.add_argument("--hf-loader", choices=HF_LOADERS, default="auto",
                        help="how to load the HF side of the slow/fast parity check (default auto)")
    parser.add_argument("--no-parity", action="store_true", help="skip the slow/fast parity check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# ----------------------------------------------------------------------------------------------------
# Text

_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'|^[ \t]*#+ ([^\n]*)$', re.S | re.M)


@functools.lru_cache(maxsize=4)
def _stdlib_english(n: int) -> tuple:
    out: List[str] = []
    std = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "encodings"}
    for root, dirs, files in os.walk(std):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                text = Path(root, name).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for groups in _DOCSTRING.findall(text):
                for line in "".join(groups).splitlines():
                    line = line.strip()
                    if (len(line.split()) >= 4 and _PROSE.search(line) and line.isprintable()
                            and not _spm.has_cjk(line)):
                        out.append(line)
                        if len(out) >= n:
                            return tuple(out)
    return tuple(out)


_PROSE = re.compile(r"[A-Za-z]{3,} [a-z]{2,} ")


def stdlib_english_lines(n: int) -> List[str]:
    """Up to `n` lines of English prose without CJK: docstring and comment lines (4+ words, stripped)
    of the Python standard library, in a fixed file order. Deterministic for a given Python version."""
    if n <= 0:
        return []
    return list(_stdlib_english(int(n)))


def read_lines(specs, *, max_lines: int, text_field: str = "text", max_line: int = MAX_LINE_BYTES) -> List[str]:
    lines: List[str] = []
    for path in corpus.expand_inputs(specs):
        n = 0
        for doc in corpus.iter_documents(path, text_field=text_field, max_line=max_line):
            lines.append(doc)
            n += 1
            if n >= max_lines:
                break
    return lines


# ----------------------------------------------------------------------------------------------------
# Measures

def _hf_tokenizer(path, proto, loader: str):
    """The HF side of the parity check, or (None, reason)."""
    p = Path(path)
    if loader == "llama":
        from transformers import LlamaTokenizer
        if p.is_dir():
            check_tokenizer_dir(p)
            return (LlamaTokenizer.from_pretrained(str(p), trust_remote_code=TRUST_REMOTE_CODE),
                    "LlamaTokenizer.from_pretrained(dir)")
        tmp = tempfile.mkdtemp(prefix="zhllama-report-")
        try:
            shutil.copy(p, Path(tmp) / "tokenizer.model")
            return (LlamaTokenizer.from_pretrained(tmp, trust_remote_code=TRUST_REMOTE_CODE),
                    "LlamaTokenizer (transformers conversion of tokenizer.model)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return hft.load_hf_tokenizer(p), "AutoTokenizer.from_pretrained(dir)"
    if proto.trainer_spec.model_type != _spm.BPE:
        return None, f"n/a ({_spm.model_type_name(proto)} model)"
    return hft.hf_tokenizer_from_proto(proto), "zhllama tokenizer.json (built from the .model)"


def token_figures(lines: List[str], ids: List[List[int]], fallback_ids) -> dict:
    """The compression columns shared by both tokenizer kinds: tokens per Chinese character (lines with
    a CJK character), per English word (the other lines), and the share of tokens in `fallback_ids`
    (byte fallback pieces, or byte-level tokens that are not whole characters)."""
    zh_tok = zh_chars = en_tok = en_words = all_tok = fallback_tok = zh_lines = 0
    for t, e in zip(lines, ids):
        all_tok += len(e)
        fallback_tok += sum(1 for i in e if i in fallback_ids)
        if _spm.has_cjk(t):
            zh_lines += 1
            zh_tok += len(e)
            zh_chars += len(t)
        else:
            en_tok += len(e)
            en_words += len(t.split())
    return {"lines": len(lines), "zh_lines": zh_lines, "en_lines": len(lines) - zh_lines,
            "zh_tokens_per_char": zh_tok / zh_chars if zh_chars else None,
            "en_tokens_per_word": en_tok / en_words if en_words else None,
            "byte_fallback_share": fallback_tok / all_tok if all_tok else None, "tokens": all_tok}


def reference_figures(lines: List[str], ids: List[List[int]], ref_ids: List[List[int]]) -> dict:
    """Lines tokenized differently from the reference: all, and those without a CJK character (the
    merge's promise is 0 there)."""
    cjk_free_differ = [t for t, a, b in zip(lines, ids, ref_ids) if a != b and not _spm.has_cjk(t)]
    return {"ref_differ_all": sum(a != b for a, b in zip(ids, ref_ids)),
            "ref_differ_cjk_free": len(cjk_free_differ),
            "ref_differ_cjk_free_examples": cjk_free_differ[:5]}


def measure(path, lines: List[str], *, reference=None, ref_ids=None, parity: bool = True,
            hf_loader: str = "auto") -> dict:
    """All figures for one tokenizer over `lines` (see the module doc)."""
    proto = _spm.load_proto(path)
    sp = _spm.processor(proto)
    ids = sp.encode(lines)
    byte_ids = {i for i, p in enumerate(proto.pieces) if p.type == _spm.BYTE}

    r = {"tokenizer": str(path), "vocab_size": len(proto.pieces), "model_type": _spm.model_type_name(proto),
         **token_figures(lines, ids, byte_ids)}

    # Reachability: of the pieces added to the reference, or of every normal piece.
    scope, start = "all", 0
    if reference is not None:
        prefix = _spm.common_prefix_size(reference, proto)
        if prefix == len(reference.pieces) and len(proto.pieces) >= prefix:
            scope, start = "added", prefix
    check = [i for i in range(start, len(proto.pieces)) if proto.pieces[i].type == _spm.NORMAL]
    if proto.trainer_spec.model_type == _spm.BPE:
        unreachable = _spm.unreachable_pieces(proto, check)
        r["unreachable"] = len(unreachable)
        r["unreachable_examples"] = [proto.pieces[i].piece for i in unreachable[:20]]
    else:
        r["unreachable"] = None  # only meaningful for BPE (unigram can always emit a piece)
    r["unreachable_checked"] = len(check)
    r["unreachable_scope"] = scope

    if parity:
        hf, how = _hf_tokenizer(path, proto, hf_loader)
        r["parity_loader"] = how
        if hf is not None:
            pr = _parity(proto, hf, lines)
            r["parity_differ"] = pr["differ"]
            r["parity_bos_ok"] = pr["bos_ok"]
            r["parity_examples"] = pr["examples"]
        else:
            r["parity_differ"] = None

    if ref_ids is not None:
        r.update(reference_figures(lines, ids, ref_ids))
    return r


def build_report(tokenizers, lines: List[str], *, reference=None, parity=True, hf_loader="auto") -> dict:
    from zhllama.vocab import bpe_report  # here, not at the top: bpe_report imports this module

    ref_proto = ref_ids = None
    rows = []
    if reference is not None and is_bpe_json_base(reference):
        ref_ids = bpe_report.encode_lines(load_bpe(reference), lines)
    elif reference is not None:
        ref_proto = _spm.load_proto(reference, "reference")
        ref_ids = _spm.processor(ref_proto).encode(lines)
    for t in tokenizers:
        if is_bpe_json_base(t):  # a byte-level BPE tokenizer.json (LLaMA-3, SmolLM2)
            rows.append(bpe_report.measure(t, lines, reference=reference, ref_ids=ref_ids, parity=parity))
            continue
        rows.append(measure(t, lines, reference=ref_proto, ref_ids=ref_ids, parity=parity, hf_loader=hf_loader))
    return {"lines": len(lines), "zh_lines": sum(_spm.has_cjk(t) for t in lines),
            "reference": str(reference) if reference is not None else None, "tokenizers": rows}


def _fmt(v, kind):
    if v is None:
        return "n/a"
    if kind == "f":
        return f"{v:.3f}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    return f"{v:,}"


def format_table(report: dict) -> str:
    rows = report["tokenizers"]
    has_ref = report["reference"] is not None
    head = ["tokenizer", "vocab", "zh tok/char", "en tok/word", "byte fb", "unreachable", "slow/fast differ"]
    if has_ref:
        head += ["differ vs ref (no CJK)", "differ vs ref (all)"]
    table = [head]
    for r in rows:
        unreach = "n/a" if r["unreachable"] is None else f"{r['unreachable']:,}/{r['unreachable_checked']:,} {r['unreachable_scope']}"
        par = r.get("parity_differ")
        par = "skipped" if "parity_differ" not in r else ("n/a" if par is None else f"{par:,}/{r['lines']:,}")
        row = [r["tokenizer"], _fmt(r["vocab_size"], "d"), _fmt(r["zh_tokens_per_char"], "f"),
               _fmt(r["en_tokens_per_word"], "f"), _fmt(r["byte_fallback_share"], "pct"), unreach, par]
        if has_ref:
            row += [f"{r['ref_differ_cjk_free']:,}/{r['en_lines']:,}", f"{r['ref_differ_all']:,}/{r['lines']:,}"]
        table.append(row)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = []
    for k, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"{report['lines']:,} lines ({report['zh_lines']:,} with CJK, "
                 f"{report['lines'] - report['zh_lines']:,} without)"
                 + (f"; reference: {report['reference']}" if has_ref else ""))
    for r in rows:
        if r.get("parity_loader"):
            how = r["parity_loader"] if r["model_type"] == "byte-level bpe" else f"sentencepiece vs {r['parity_loader']}"
            lines.append(f"slow/fast for {r['tokenizer']}: {how}")
    return "\n".join(lines)


def run(args) -> int:
    if not args.text and args.english_sample <= 0:
        raise UserError("give text to measure on: --text FILE... and/or --english-sample N")
    for t in args.tokenizer + ([args.reference] if args.reference else []):
        if bpe.is_bpe_json_base(t):
            bpe.check_byte_level_bpe(bpe.read_tokenizer_json(t), bpe.tokenizer_json_path(t))
        else:
            _spm.load_proto(t)  # every bad tokenizer fails before any work, naming its file
    lines = (read_lines(args.text, max_lines=args.max_lines, text_field=args.text_field,
                        max_line=max_line_bytes(args)) if args.text else [])
    if args.english_sample > 0:
        lines += stdlib_english_lines(args.english_sample)
    if not lines:
        raise UserError("the given text holds no lines")
    report = build_report(args.tokenizer, lines, reference=args.reference, parity=not args.no_parity,
                          hf_loader=args.hf_loader)
    if args.json:
        json.dump(report, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(report))
    return 0
