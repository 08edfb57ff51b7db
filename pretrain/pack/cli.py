"""`zhllama data pack`: the options, their checks, and the run (the description is the package's
docstring, shown by --help)."""

import math
import os
import shutil
import time

from zhllama import corpus, hfdatasets
from zhllama.errors import UserError
from zhllama.fsutil import output_target, swap_in
from zhllama.inputfile import add_max_line_argument, max_line_bytes
from zhllama.log import get_logger
from zhllama.outlock import output_lock

from .. import shards as fmt
from .packer import Packer
from .settings import load_tokenizer, make_settings
from .writer import manifest_is_current, prepare_out_dir, prepare_staging, source_stats, staging_dir, unlink

log = get_logger("zhllama.pack")


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", required=True,
                        help="SentencePiece tokenizer: a .model file or a dir with tokenizer.model "
                             "(e.g. the output of `zhllama vocab merge`); or a HF tokenizer.json (a dir "
                             "with one and no tokenizer.model: LLaMA-3, SmolLM2), BOS/EOS from its "
                             "tokenizer_config.json")
    parser.add_argument("--input", required=True, nargs="+", metavar="F",
                        help="inputs, packed in the order given: files, directories, globs; .txt (one "
                             "document per line, or see --doc-sep), .jsonl (see --text-field), optionally "
                             ".gz; .parquet and .arrow (the --text-field column); a folder written by "
                             "datasets' save_to_disk (see --split); a Hub dataset, streamed: "
                             "hf://OWNER/NAME[@REVISION][/CONFIG] (needs the network)")
    parser.add_argument("--out", required=True, help="output directory for shards, index and manifest")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per block (default 512)")
    parser.add_argument("--keep-documents", action="store_true",
                        help="never cut a document that fits a block: documents go whole into blocks, first fit "
                             "(for long-context stages, e.g. --block-size 16384); longer ones are cut into blocks")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (default: the CPUs available, %(default)s here)")
    parser.add_argument("--validation-ratio", type=float, default=0.001,
                        help="share of documents in the validation split, chosen by a hash of the "
                             "document's text (default 0.001; 0 for none)")
    parser.add_argument("--text-field", default="text",
                        help="field holding the text in JSON lines, column in parquet/Arrow files and "
                             "datasets (default text)")
    parser.add_argument("--split", default="train",
                        help="the split read from a saved DatasetDict or a Hub dataset (default train); "
                             "a saved Dataset without splits is read whole")
    parser.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                        help="text files: one document per line (default) or blank-line separated "
                             "paragraphs")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first undecodable or malformed line instead of counting and "
                             "skipping it")
    # The two work sizes, in MB of input text: a unit is one shard and the resume granularity, a slice one
    # worker task (load balancing only; the output does not depend on it).
    for flag, default, what in (("--unit-mb", 64.0, "text per work unit / shard in MB (default 64): the "
                                                    "resume granularity"),
                                ("--slice-mb", 1.0, "text per task sent to a worker in MB (default 1): the "
                                                    "load-balancing granularity; does not change the output")):
        parser.add_argument(flag, type=float, default=default, help=what)
    add_max_line_argument(parser, "line (a document, or a paragraph with --doc-sep blank)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a pack in --out that was built with another tokenizer or options")


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)



def _inputs(args) -> list:
    """The inputs in order: files (a saved dataset's Arrow files in its place) and Hub datasets pinned to
    a commit. Every input problem surfaces here, before any work is done."""
    paths = []
    for p in corpus.expand_sources(args.input, args.split):
        if isinstance(p, hfdatasets.HubDataset):
            p = hfdatasets.resolve(p)
        else:
            corpus.check_readable(p, args.text_field)
        paths.append(p)
    return paths


def check_args(args) -> None:
    if args.block_size < 2:
        raise UserError(f"--block-size must be at least 2, not {args.block_size}")
    if not 0.0 <= args.validation_ratio < 1.0:
        raise UserError(f"--validation-ratio must be in [0, 1), not {args.validation_ratio}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if not (math.isfinite(args.unit_mb) and math.isfinite(args.slice_mb)) or args.unit_mb <= 0 or args.slice_mb <= 0:
        raise UserError("--unit-mb and --slice-mb must be positive numbers")


def run(args) -> int:
    check_args(args)
    with output_lock(args.out, "zhllama data pack", "pack"):   # one writer per --out, checked writable
        return _pack(args)


def _pack(args) -> int:
    """The pack itself. Over a complete pack, the new one is built beside it (`.<out>.pack-next`,
    reusing its unchanged units through hard links) and swapped in only when complete: until then the
    old pack stays whole and usable, whatever happens (a full disk, a kill, a bad line). A first pack is
    built in --out itself, marked in progress (training refuses it) until its manifest is written. Either
    way an interrupted pack resumes where it stopped when the same command runs again."""
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    paths = _inputs(args)
    settings = make_settings(args, tok)
    out = output_target(args.out)    # through a symbolic link: the directory it points to
    manifest = prepare_out_dir(out, settings, args.overwrite)
    sources = source_stats(paths)
    if manifest is None or manifest_is_current(out, manifest, settings, sources):
        shutil.rmtree(staging_dir(out), ignore_errors=True)   # a rebuild nobody needs any more
    if manifest is not None and manifest_is_current(out, manifest, settings, sources):
        msg = (f"{out} is up to date: same tokenizer, options and {len(paths)} unchanged input(s); "
               "nothing to do")
        log.info(msg)
        print(msg)
        return 0

    # The directory written from here must not look complete until its new manifest.
    work = out if manifest is None else prepare_staging(out, settings)
    unlink(work / fmt.MANIFEST)
    unlink(work / fmt.INDEX)
    (work / fmt.PROGRESS).touch()         # marks the dir as a pack in progress (resumable)
    shard_dir = work / fmt.SHARD_DIR
    shard_dir.mkdir(exist_ok=True)
    for p in shard_dir.glob(".*.tmp"):
        unlink(p)

    result = Packer(args, tok, settings, work, paths, sources, max_line_bytes(args)).pack()
    if work != out:
        swap_in(work, out)              # the old pack was whole until this moment, the new one from it
    elapsed = time.perf_counter() - t0
    c = result["counts"]
    tr, va = c["splits"]["train"], c["splits"]["validation"]
    mb = c["input"]["bytes"] / 1e6
    print(f"packed {c['input']['documents']:,} documents ({mb:,.1f} MB) into {tr['blocks']:,} train + "
          f"{va['blocks']:,} validation blocks of {args.block_size} tokens "
          f"({tr['tokens'] + va['tokens']:,} tokens; dropped {tr['dropped_tokens'] + va['dropped_tokens']} "
          f"in final partial blocks; skipped {c['input']['skipped']} bad lines, {c['input']['empty']} "
          f"empty documents) in {elapsed:,.1f}s -> {out}")
    for line in length_lines(tr, args.block_size):
        print(line)
    return 0


def length_lines(split: dict, block_size: int) -> list:
    """The printed summary of a split's document lengths and, with --keep-documents, of what stayed whole."""
    lengths = split.get("document_lengths")
    if not lengths or not lengths["documents"]:
        return []
    n, t = lengths["documents"], lengths["tokens"]
    shares = " ".join(f"<={b['up_to']:,}: {100 * b['documents'] / n:.0f}%" for b in lengths["buckets"])
    longer = lengths["longer_than_block"]
    lines = [f"document lengths in tokens (train, BOS/EOS included): mean {lengths['mean']:,.0f}, max "
             f"{lengths['max']:,}; documents {shares}; {longer['documents']:,} longer than a block of "
             f"{block_size:,} ({100 * longer['tokens'] / t:.1f}% of the tokens)"]
    kept = split.get("documents_kept_whole")
    if kept:
        lines.append(f"--keep-documents: {kept['kept_whole']:,} of the {kept['fit']:,} documents that fit a block "
                     f"are whole in one block; {kept['cut_to_fill']:,} were cut to fill a block's last gap (the "
                     f"longest {kept['longest_cut']:,} tokens); {kept['in_tail']:,} went to the final partial "
                     f"blocks; {kept['longer']:,} longer than a block were cut into blocks")
    return lines
