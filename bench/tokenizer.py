"""Tokenizer benchmark: train 20k Chinese pieces on ../shared/data/zh, merge into LLaMA, compare.

    python bench/tokenizer.py [--shared ../shared] [--threads 2] [--jieba] [--json bench_tokenizer.json]

1. Hold-out: every 20th line (line number 1, 21, 41, ...) of each file in data/zh is held out;
   the other 95% is the training text. Deterministic.
2. `zhllama vocab train` on the training text (20,000 pieces, --threads N, pinned to N cores where
   the OS allows): wall time. With --jieba, a second run with jieba pre-segmentation.
3. `zhllama vocab merge` into LLaMA (default merge) and `--compat v1` with the v1 anchor.
4. `zhllama vocab report` on the held-out Chinese + 30,000 lines of English prose (Python
   docstrings/comments) plus variants with leading spaces, runs of spaces, digits and newlines:
   LLaMA, the v1 merge, Chinese-LLaMA-2's tokenizer, ours. Prints the table, the ratios of our
   Chinese tokens/char to the anchors', and the checks of the issue; and how many lines transformers'
   own conversion of LLaMA's tokenizer.model gets wrong.

Needs ../shared (exits 2 without it). Takes about a minute on 2 cores.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from zhllama.log import setup_logging
from zhllama.vocab import train as vtrain
from zhllama.vocab.merge import merge_tokenizers
from zhllama.vocab.report import build_report, format_table, stdlib_english_lines

REPO = Path(__file__).resolve().parent.parent


def variants(lines, seed=0):
    """Whitespace/digit/newline variants of some lines, for the slow/fast parity check."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        k = rng.randrange(5)
        if k == 0:
            out.append(" " * rng.randint(1, 8) + line)
        elif k == 1:
            out.append((" " * rng.randint(2, 9)).join(line.split(" ")) + "  ")
        elif k == 2:
            out.append(line[: len(line) // 2] + "\n" + line[len(line) // 2:] + "\n\n")
        elif k == 3:
            out.append(f"{rng.randint(0, 10**8)}  {line} {rng.random():.4f}")
        else:
            out.append("\t" + line + "   ")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=20000)
    ap.add_argument("--jieba", action="store_true", help="also time and measure a jieba pre-segmented model")
    ap.add_argument("--work", default=None, help="keep the outputs here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args(argv)

    data = Path(args.shared) / "data"
    need = [data / "zh", data / "llama" / "tokenizer.model", data / "anchors" / "chinese_llama_sp.model",
            data / "anchors" / "chinese_llama2_tokenizer.model"]
    for p in need:
        if not p.exists():
            print(f"bench/tokenizer.py: needs {p} (the shared data is not present)", file=sys.stderr)
            return 2
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cores)

    setup_logging(False)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zhllama-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_dir, held = work / "train", work / "heldout_zh.txt"
    shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir()
    held_lines = []
    for f in sorted((data / "zh").glob("*.txt")):
        lines = f.read_text(encoding="utf-8").splitlines()
        held_lines += [t for i, t in enumerate(lines) if i % 20 == 0 and t.strip()]
        (train_dir / f.name).write_text("\n".join(t for i, t in enumerate(lines) if i % 20 != 0) + "\n",
                                        encoding="utf-8")
    held.write_text("\n".join(held_lines) + "\n", encoding="utf-8")
    train_mb = sum(p.stat().st_size for p in train_dir.iterdir()) / 1e6
    print(f"[bench] training text {train_mb:.1f} MB, held out {len(held_lines):,} lines; "
          f"{args.threads} threads on {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} cores")

    figures = {"train_mb": round(train_mb, 2), "heldout_lines": len(held_lines), "threads": args.threads}
    runs = [("ours", False)] + ([("ours+jieba", True)] if args.jieba else [])
    merged_dirs = {}
    for name, use_jieba in runs:
        t0 = time.perf_counter()
        cfg = vtrain.train([train_dir], work / f"sp_{name}", vocab_size=args.vocab_size, threads=args.threads,
                           use_jieba=use_jieba, overwrite=True)
        wall = time.perf_counter() - t0
        figures[f"train_seconds_{name}"] = round(wall, 2)
        figures[f"train_breakdown_{name}"] = cfg["seconds"]
        print(f"[bench] vocab train ({name}): {wall:.1f}s wall ({cfg['seconds']})")
        t0 = time.perf_counter()
        rep = merge_tokenizers(data / "llama" / "tokenizer.model", work / f"sp_{name}" / "zh_sp.model",
                               work / f"merged_{name}", overwrite=True)
        figures[f"merge_seconds_{name}"] = round(time.perf_counter() - t0, 2)
        figures[f"merge_counts_{name}"] = rep["counts"]
        merged_dirs[name] = work / f"merged_{name}"
        print(f"[bench] vocab merge ({name}): {rep['final_size']:,} pieces, counts {rep['counts']}")
    merge_tokenizers(data / "llama" / "tokenizer.model", data / "anchors" / "chinese_llama_sp.model",
                     work / "merged_v1", compat="v1", overwrite=True)

    english = stdlib_english_lines(30000)
    lines = held_lines + english
    lines += variants(held_lines[::10] + english[::20], seed=1)
    tokenizers = [str(data / "llama" / "tokenizer.model"), str(work / "merged_v1"),
                  str(data / "anchors" / "chinese_llama2_tokenizer.model")] + [str(d) for d in merged_dirs.values()]
    t0 = time.perf_counter()
    report = build_report(tokenizers, lines, reference=data / "llama" / "tokenizer.model")
    figures["report_seconds"] = round(time.perf_counter() - t0, 2)
    print()
    print(format_table(report))
    print()

    rows = {r["tokenizer"]: r for r in report["tokenizers"]}
    v1 = rows[str(work / "merged_v1")]
    v2 = rows[str(data / "anchors" / "chinese_llama2_tokenizer.model")]
    # zh tokens/char on the held-out Chinese only (the variants above add spaces)
    held_only = build_report(tokenizers, held_lines, parity=False)
    zh = {r["tokenizer"]: r["zh_tokens_per_char"] for r in held_only["tokenizers"]}
    figures["zh_tokens_per_char_heldout"] = zh
    checks = {}
    for name, d in merged_dirs.items():
        r = rows[str(d)]
        ours = zh[str(d)]
        print(f"[bench] {name}: zh tokens/char {ours:.4f} (held-out) vs v1 {zh[str(work / 'merged_v1')]:.4f} "
              f"(ratio {ours / zh[str(work / 'merged_v1')]:.3f}) and v2 "
              f"{zh[str(data / 'anchors' / 'chinese_llama2_tokenizer.model')]:.4f} "
              f"(ratio {ours / zh[str(data / 'anchors' / 'chinese_llama2_tokenizer.model')]:.3f}); vocab {r['vocab_size']:,}")
        checks[name] = {
            "1_cjk_free_lines_differ": r["ref_differ_cjk_free"],
            "2_unreachable_added": r["unreachable"],
            "3_slow_fast_differ": r["parity_differ"],
            "3_bos_ok": r["parity_bos_ok"],
            "4_lower_than_both_anchors": ours < zh[str(work / "merged_v1")] and
                                         ours < zh[str(data / "anchors" / "chinese_llama2_tokenizer.model")],
            "4_vocab_at_most_51200": r["vocab_size"] <= 51200,
            "6_train_seconds": figures[f"train_seconds_{name}"],
        }
        print(f"[bench] {name} checks: {checks[name]}")
    print(f"[bench] v1 merge: {v1['ref_differ_cjk_free']:,}/{v1['en_lines']:,} CJK-free lines differ from LLaMA "
          f"({100 * v1['ref_differ_cjk_free'] / max(v1['en_lines'], 1):.1f}%), unreachable {v1['unreachable']:,}/"
          f"{v1['unreachable_checked']:,} ({100 * v1['unreachable'] / max(v1['unreachable_checked'], 1):.2f}%)")
    print(f"[bench] v2 anchor: {v2['ref_differ_cjk_free']:,} CJK-free lines differ, unreachable {v2['unreachable']:,}")
    conv = build_report([str(data / "llama" / "tokenizer.model")], lines, hf_loader="llama")["tokenizers"][0]
    figures["llama_transformers_conversion_differ"] = conv["parity_differ"]
    print(f"[bench] LLaMA tokenizer.model converted by transformers ({conv['parity_loader']}): "
          f"{conv['parity_differ']:,}/{conv['lines']:,} lines differ from sentencepiece; zhllama's tokenizer.json: "
          f"{rows[str(data / 'llama' / 'tokenizer.model')]['parity_differ']:,}")
    figures["report"] = report
    figures["checks"] = checks
    if args.json:
        Path(args.json).write_text(json.dumps(figures, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"[bench] figures written to {args.json}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(c["1_cjk_free_lines_differ"] == 0 and c["2_unreachable_added"] == 0 and c["3_slow_fast_differ"] == 0
             and c["4_lower_than_both_anchors"] and c["4_vocab_at_most_51200"] for c in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
