"""Perplexity, bits per character and tokens/s of a checkpoint on held-out text.

Each document (a line of a .txt file, a JSON line's "text", a parquet row; blank-line paragraphs with
--doc-sep blank) is tokenized as BOS + text and every text token is scored once, given the tokens
before it in the same document: documents longer than --max-length are scored in sliding windows
that advance by --stride tokens, each window scoring only its new tokens with the rest as context.

  perplexity     exp(total NLL / scored tokens)  (token-weighted over all documents)
  bits per char  total NLL / ln 2 / characters of the scored text

Perplexity depends on the tokenizer (a model that splits a character into two tokens has two easier
predictions where another has one), so it only compares models with the same tokenizer. Bits per
character divides the same total information by the characters of the text, not by tokens, so it
compares a 32,000-token LLaMA with its 50,000-token Chinese extension fairly. tokens/s is scored
tokens over the time spent in forward passes (tokenization and loading excluded).

examples:
  zhllama eval --model merged/ --text heldout_zh.txt heldout_en.txt
  zhllama eval --model llama-7b/ --model merged/ --text heldout_zh.txt --json

With --benchmark cmmlu|ceval it scores multiple-choice accuracy instead (see export/benchmark.py):
  zhllama eval --benchmark cmmlu --data cmmlu/ --model merged/ --shots 5 --out results/

Long context (export/longeval.py): perplexity by position bucket on long held-out documents, and
passkey retrieval by length and depth, a table per model, JSON with --out FILE:
  zhllama eval --model base/ --model merged-16k/ --text long_heldout.txt --positions --max-length 16384 \
      --passkey --lengths 4096,8192,16384 --out long.json
  zhllama eval --model base/ --adapter runs/long/final --text long.txt --positions --max-length 2048 \
      --buckets 256,512,1024,2048      # the trained model before merging: base + its adapters
"""

import json
import math
import time
from pathlib import Path
from typing import List

import torch

from zhllama.argtypes import int_range
from zhllama.corpus import expand_inputs, iter_documents
from zhllama.errors import UserError
from zhllama.fsutil import atomic_write_json
from zhllama.heldout import Window, bits_per_char, longest_first, pad_id, window_batch, windows
from zhllama.inputfile import MAX_LINE_BYTES, add_max_line_argument, max_line_bytes
from zhllama.log import get_logger
from zhllama.loss import IGNORE_INDEX, CausalLMTokenLoss
from zhllama.modelio import load_for_inference
from zhllama.pretrain.adapters import merge_adapters
from zhllama.pretrain.rope import adapter_dirs_change, context_length, hf_config
from zhllama.textenc import encode_text

from . import longeval
from .benchmark import run_benchmark

log = get_logger("zhllama.eval")


def score(model, windows_: List[Window], batch_size: int = 4, pad: int = 0):
    """(total NLL in nats, scored tokens, forward seconds) of the windows, by the training loss
    (zhllama/loss.py: the full-vocabulary logits are never held for a whole batch)."""
    nll, count, seconds = 0.0, 0, 0.0
    device = next(model.parameters()).device
    loss_sum = CausalLMTokenLoss(model)
    ordered = longest_first(windows_)
    for k in range(0, len(ordered), batch_size):
        batch = window_batch(ordered[k:k + batch_size], pad)
        labels = batch["labels"]
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = loss_sum(batch["input_ids"].to(device), labels.to(device),
                            attention_mask=batch["attention_mask"].to(device))
        seconds += time.perf_counter() - t0
        nll += float(loss)
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return nll, count, seconds


def read_documents(path, text_field="text", doc_sep="line", limit=None, max_line=MAX_LINE_BYTES) -> List[str]:
    docs = []
    for doc in iter_documents(path, text_field=text_field, doc_sep=doc_sep, max_line=max_line):
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise UserError(f"{path}: no documents to evaluate (empty file?)")
    return docs


def evaluate_docs(model, tokenizer, docs: List[str], max_length: int, stride: int, batch_size: int = 4) -> dict:
    """Perplexity, bits per character and speed of `model` on `docs` (see the module docstring)."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    wins, chars, tokens = [], 0, 0
    for doc in docs:
        ids = head + encode_text(tokenizer, doc)  # "</s>" in the text is text, as `data pack` reads it
        tokens += len(ids) - len(head)
        chars += len(doc)
        wins.extend(windows(ids, max_length, stride))
    nll, scored, seconds = score(model, wins, batch_size, pad_id(tokenizer))
    if scored == 0:
        raise UserError("no token to score: every document is empty after tokenization")
    return {
        "documents": len(docs), "characters": chars, "tokens": tokens, "scored_tokens": scored,
        "windows": len(wins), "nll": nll, "loss": nll / scored, "perplexity": math.exp(min(nll / scored, 700.0)),
        "bits_per_char": bits_per_char(nll, chars), "tokens_per_char": tokens / chars,
        "forward_seconds": round(seconds, 3), "tokens_per_s": round(scored / seconds, 1) if seconds > 0 else None,
        "max_length": max_length, "stride": stride, "first_token_scored": bos is not None,
    }


def load_with_adapters(model_dir, tokenizer_dir=None, adapters=(), device="auto", dtype="auto"):
    """(model in eval mode, tokenizer): a checkpoint with `adapters` (`zhllama train`'s final/ dirs)
    folded into its weights in order, the model `zhllama merge` would write, without writing it: with
    the RoPE settings a long-context stage recorded. Scores every stage of a run on the same text
    before anything is merged (the demo's table)."""
    config = hf_config(model_dir, adapter_dirs_change(model_dir, adapters)) if adapters else None
    model, tokenizer = load_for_inference(model_dir, tokenizer_dir, device=device, dtype=dtype, config=config)
    if adapters:
        model = merge_adapters(model, list(adapters)).eval()
    return model, tokenizer


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint dir; repeat to compare models (bits/char compares across tokenizers)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: each model's own; only with one --model)")
    parser.add_argument("--text", nargs="+",
                        help="held-out text: .txt (a document per line), .jsonl, .parquet, .gz, dirs or globs")
    parser.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default text)")
    add_max_line_argument(parser, "line (a document) of --text")
    parser.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                        help=".txt documents: one per line (default) or blank-line separated paragraphs")
    parser.add_argument("--max-length", type=int_range(2, 1 << 24), default=None,
                        help="tokens per window (default: the model's context, at most 2048; benchmarks: 2048)")
    parser.add_argument("--stride", type=int_range(1, 1 << 24), default=None,
                        help="new tokens scored per window for long documents (default: half of --max-length)")
    parser.add_argument("--batch-size", type=int_range(1, 1 << 16), default=4,
                        help="windows (benchmarks: questions) per forward pass (default 4)")
    parser.add_argument("--limit", type=int_range(1, 10 ** 12), default=None,
                        help="evaluate at most N documents per file (benchmarks: the first N questions per subject)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), float32, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON object (machine-readable)")
    bench = parser.add_argument_group("benchmarks (multiple-choice accuracy instead of perplexity)")
    bench.add_argument("--benchmark", choices=("cmmlu", "ceval"),
                       help="score CMMLU or C-Eval by the official protocol (needs --data, not --text)")
    bench.add_argument("--data", help="benchmark folder: CMMLU dev/ + test/, C-Eval dev/ + val/")
    bench.add_argument("--shots", type=int, default=0, help="dev examples before each question, 0..5 (default 0)")
    bench.add_argument("--subjects", help="comma-separated subjects (default: every one with an eval file)")
    bench.add_argument("--out", help="benchmarks: write predictions.jsonl and summary.json here (DIR/<model> for "
                                     "several); --positions / --passkey: the JSON results file")
    long = parser.add_argument_group("long context (export/longeval.py)")
    long.add_argument("--adapter", action="append", default=[], metavar="DIR",
                      help="apply these adapters (a run's final/, in training order) to the one --model first, with "
                           "the RoPE settings they trained with: the extended model before `zhllama merge`")
    long.add_argument("--positions", action="store_true",
                      help="perplexity by position bucket on --text documents of at least --max-length tokens")
    long.add_argument("--buckets", help="bucket upper edges, e.g. 256,512,1024,2048 (default 1K, 2K, 4K, ... up to "
                                        "--max-length)")
    long.add_argument("--passkey", action="store_true", help="passkey retrieval accuracy by length and depth")
    long.add_argument("--lengths", default=None,
                      help="passkey prompt lengths in tokens (default: 1/4, 1/2 and all of --max-length)")
    long.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key is hidden (0: start, 1: end)")
    long.add_argument("--trials", type=int_range(1, 10 ** 6), default=5, help="keys per length and depth (default 5)")
    long.add_argument("--seed", type=int_range(0, 2 ** 32 - 1), default=0, help="passkey keys' seed (default 0)")


def run(args) -> int:
    if args.benchmark:
        return run_benchmark(args)
    if args.adapter and len(args.model) != 1:
        raise UserError("--adapter applies to one --model (the base the adapters were trained on)")
    if args.positions or args.passkey:
        return run_long(args)
    if args.adapter:
        raise UserError("--adapter applies to --positions / --passkey (merge the adapters to score perplexity)")
    if not args.text:
        raise UserError("--text is required (or --benchmark cmmlu|ceval with --data)")
    for flag in ("data", "subjects", "out"):
        if getattr(args, flag):
            raise UserError(f"--{flag} applies to --benchmark only" + (", --positions and --passkey" if flag == "out"
                                                                       else ""))
    if args.tokenizer and len(args.model) > 1:
        raise UserError("--tokenizer applies to one --model; each of several models uses its own tokenizer")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive")
    files = expand_inputs(args.text)
    texts = {str(f): read_documents(f, args.text_field, args.doc_sep, args.limit, max_line_bytes(args))
             for f in files}
    results = []
    for model_dir in args.model:
        if not Path(model_dir).is_dir():
            raise UserError(f"--model {model_dir}: not a directory")
        model, tok = load_with_adapters(model_dir, args.tokenizer, device=args.device, dtype=args.dtype)
        max_length = args.max_length or min(context_length(model.config) or 2048, 2048)
        stride = args.stride or max(1, max_length // 2)
        if max_length < 2 or not 1 <= stride <= max_length - 1:
            raise UserError(f"need --max-length >= 2 and 1 <= --stride < --max-length (got {max_length}, {stride})")
        for f, docs in texts.items():
            r = evaluate_docs(model, tok, docs, max_length, stride, args.batch_size)
            results.append({"model": str(model_dir), "text": f, **r})
            log.info("%s on %s: ppl %.3f, %.4f bits/char, %.1f tokens/s", model_dir, f, r["perplexity"],
                     r["bits_per_char"], r["tokens_per_s"] or 0.0)
        del model
    if args.json:
        print(json.dumps({"results": results}, ensure_ascii=False, indent=2))
        return 0
    print(f"{'model':<28} {'text':<24} {'docs':>6} {'chars':>9} {'tok/char':>8} {'ppl':>10} {'bits/char':>9} "
          f"{'tokens/s':>9}")
    for r in results:
        print(f"{_short(r['model'], 28):<28} {_short(r['text'], 24):<24} {r['documents']:>6,} {r['characters']:>9,} "
              f"{r['tokens_per_char']:>8.3f} {r['perplexity']:>10.3f} {r['bits_per_char']:>9.4f} "
              f"{r['tokens_per_s'] or 0:>9,.1f}")
    return 0


def run_long(args) -> int:
    """--positions / --passkey: a table per model, all results as JSON in --out."""
    if args.positions and not args.text:
        raise UserError("--positions needs --text: held-out documents at least --max-length tokens long")
    for flag in ("data", "subjects"):
        if getattr(args, flag):
            raise UserError(f"--{flag} applies to --benchmark only")
    if args.trials < 1 or args.batch_size < 1:
        raise UserError("--trials and --batch-size must be positive")
    depths = longeval.parse_numbers(args.depths, "--depths", float)
    if not all(0 <= d <= 1 for d in depths):
        raise UserError(f"--depths {args.depths}: each in [0, 1]")
    texts = {}
    if args.positions:
        texts = {str(f): read_documents(f, args.text_field, args.doc_sep, args.limit, max_line_bytes(args))
                 for f in expand_inputs(args.text)}
    results = []
    for model_dir in args.model:
        if not Path(model_dir).is_dir():
            raise UserError(f"--model {model_dir}: not a directory")
        model, tok = load_with_adapters(model_dir, args.tokenizer, args.adapter, device=args.device, dtype=args.dtype)
        name = model_dir + "".join(f" + {Path(a).parent.name or a}" for a in args.adapter)
        max_length = args.max_length or context_length(model.config) or 2048
        if max_length < 4:
            raise UserError(f"--max-length {max_length}: too short for position buckets")
        for f, docs in texts.items():
            r = longeval.position_perplexity(model, tok, docs, max_length,
                                             longeval.parse_buckets(args.buckets, max_length), args.batch_size)
            results.append({"name": name, "model": model_dir, "adapters": args.adapter, "text": f,
                            "context_length": context_length(model.config), "positions": r})
        if args.passkey:
            lengths = (longeval.parse_numbers(args.lengths, "--lengths") if args.lengths else
                       sorted({max(64, max_length // 4), max(64, max_length // 2), max_length}))
            results.append({"name": name, "model": model_dir, "adapters": args.adapter,
                            "context_length": context_length(model.config),
                            "passkey": longeval.passkey_accuracy(model, tok, lengths, depths, args.trials, args.seed)})
        del model
    with_positions = [r for r in results if "positions" in r]
    for f in texts:
        print(f"{f}:")
        print(longeval.positions_table([r for r in with_positions if r["text"] == f]))
        print()
    for r in results:
        if "passkey" in r:
            print(longeval.passkey_table(r, r["name"]))
            print()
    if args.out:
        atomic_write_json(Path(args.out), {"results": results})
        print(f"wrote {args.out}")
    return 0


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
