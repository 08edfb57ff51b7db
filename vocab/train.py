"""Train the Chinese SentencePiece model on text files.

    zhllama vocab train --input data/zh --vocab-size 20000 --out zh_sp

Inputs: plain text (one document a line), JSON lines with a `text` field (`--text-field`), either
gzipped; files, directories (recursively) and globs. LLaMA-compatible settings by default: BPE, byte
fallback, split digits, identity normalization, dummy prefix, extra whitespace kept, character
coverage 0.9995, 20,000 pieces.

Corpora far larger than memory: documents are streamed and cut into sentences (lines, and long lines
at sentence punctuation), and at most `--max-sentences` of them are kept by uniform reservoir
sampling (seeded: the same inputs and seed give the same sample and the same model).

`--jieba` segments Chinese text with jieba first and forbids pieces from crossing a word boundary
between two Chinese words (sentencepiece's pretokenization delimiter), so pieces are whole words or
parts of one.

Writes DIR/zh_sp.model, DIR/zh_sp.vocab and DIR/train_config.json (every setting, the corpus counts,
the sample, the time), atomically.
"""

import io
import json
import logging
import multiprocessing as mp
import os
import random
import re
import time
from importlib.metadata import version
from pathlib import Path

from zhllama import corpus
from zhllama import spm as _spm
from zhllama.argtypes import SEED, float_range, int_range
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, sha256_file
from zhllama.inputfile import MAX_LINE_BYTES, add_max_line_argument, max_line_bytes
from zhllama.log import Progress, get_logger
from zhllama.outlock import output_lock

log = get_logger("zhllama.vocab.train")

MODEL_NAME = "zh_sp"
DELIMITER = "\u241f"  # SYMBOL FOR UNIT SEPARATOR: never in normal text; the jieba word boundary

# LLaMA's trainer spec, minus what depends on the corpus (see ../shared/data/llama/tokenizer.model).
LLAMA_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.9995,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
)

_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")
MIN_SENTENCE_BYTES = 4  # one UTF-8 character at most: a hard cut always makes progress


def add_arguments(parser):
    parser.add_argument("--input", "-i", nargs="+", required=True,
                        help="text files, JSON-lines files (.jsonl/.json), .gz, directories or globs")
    parser.add_argument("--out", "-o", required=True, help="output directory (zh_sp.model, zh_sp.vocab, train_config.json)")
    parser.add_argument("--vocab-size", type=int_range(1, 1 << 22),
                        default=20000, help="pieces in the model (default 20000)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="bpe (default, like LLaMA; what `vocab merge` expects) or unigram")
    parser.add_argument("--character-coverage", type=float_range(0, 1, above_low=True), default=0.9995,
                        help="share of characters covered by pieces; the rest falls back to bytes (default 0.9995)")
    parser.add_argument("--max-sentences", type=int_range(1, 10 ** 10), default=2_000_000,
                        help="train on a uniform sample of at most this many sentences (default 2,000,000)")
    parser.add_argument("--max-sentence-length", type=int_range(MIN_SENTENCE_BYTES, 1 << 30), default=4192,
                        help="longest sentence in bytes; longer lines are cut at sentence punctuation (default "
                             f"4192, at least {MIN_SENTENCE_BYTES})")
    add_max_line_argument(parser, "line (a document) of the input")
    parser.add_argument("--threads", type=int_range(1, 1024),
                        default=None, help="training threads (default: all cores)")
    parser.add_argument("--seed", type=SEED, default=42, help="sampling seed (default 42)")
    parser.add_argument("--jieba", action="store_true",
                        help="pre-segment Chinese with jieba so pieces never cross a word boundary")
    parser.add_argument("--text-field", default="text", help="the field of JSON lines holding the text (default text)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip lines that are not UTF-8 / not valid JSON (default: stop with an error)")
    parser.add_argument("--base", default=None,
                        help="a byte-level BPE base (tokenizer.json, or a directory holding one: LLaMA-3, "
                             "SmolLM2): learn byte-level BPE tokens under its normalizer and pre-tokenizer "
                             "instead of a SentencePiece model (writes DIR/tokenizer.json; see vocab/bpe_train.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def split_sentences(text: str, max_bytes: int):
    """Lines of `text`; a line longer than `max_bytes` (UTF-8) is cut at sentence punctuation, then
    hard-cut (on a character boundary) if a sentence is still too long. Linear in the text's length:
    each sentence is encoded once and the sentences gathered into a piece are joined once."""
    if max_bytes < MIN_SENTENCE_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_SENTENCE_BYTES}, not {max_bytes}")
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        buf, size = [], 0            # sentences of the piece being gathered, and its size in bytes
        for part in _SENTENCE_END.split(line):
            raw = part.encode("utf-8")
            if size + len(raw) <= max_bytes:
                buf.append(part)
                size += len(raw)
                continue
            piece = "".join(buf)
            if piece.strip():
                yield piece
            cuts = _hard_cut(raw, max_bytes)
            yield from cuts[:-1]
            buf, size = [cuts[-1]], len(cuts[-1].encode("utf-8"))
        piece = "".join(buf)
        if piece.strip():
            yield piece


def _hard_cut(raw: bytes, max_bytes: int) -> list:
    """`raw` (UTF-8) cut into pieces of at most `max_bytes`, each cut on a character boundary; the
    last piece is what is left (it may be short)."""
    out, start = [], 0
    while len(raw) - start > max_bytes:
        end = start + max_bytes
        while raw[end] & 0xC0 == 0x80:     # a continuation byte: back up to the character's start
            end -= 1
        out.append(raw[start:end].decode("utf-8"))
        start = end
    out.append(raw[start:].decode("utf-8"))
    return out


class Reservoir:
    """Uniform sample of at most `k` items from a stream (Algorithm R), seeded."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.items = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, item):
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.k:
                self.items[j] = item


def jieba_delimit(sentence: str, cut) -> str:
    """Insert DELIMITER between two adjacent jieba words that both contain CJK (Latin words, numbers
    and spaces keep their usual sentencepiece treatment)."""
    out = []
    prev_cjk = False
    for word in cut(sentence):
        cjk = _spm.has_cjk(word)
        if out and cjk and prev_cjk:
            out.append(DELIMITER)
        out.append(word)
        prev_cjk = cjk
    return "".join(out)


def _jieba_init():
    import jieba  # on demand: --jieba only

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def _jieba_chunk(chunk):
    jieba = _jieba_init()
    return [jieba_delimit(s, jieba.cut) for s in chunk]


def jieba_segment(sentences, processes: int = 1, chunk: int = 2000):
    """`jieba_delimit` over all sentences, in `processes` worker processes (fork) when there are many."""
    _jieba_init()  # load the dictionary once, before forking
    if processes <= 1 or len(sentences) < 2 * chunk:
        return _jieba_chunk(sentences)
    try:
        ctx = mp.get_context("fork")
    except ValueError:  # no fork (Windows): one process
        return _jieba_chunk(sentences)
    parts = [sentences[i:i + chunk] for i in range(0, len(sentences), chunk)]
    with ctx.Pool(processes) as pool:
        out = []
        for seg in pool.imap(_jieba_chunk, parts):
            out.extend(seg)
    return out


def read_sample(inputs, *, max_sentences: int, max_sentence_length: int, seed: int, text_field: str,
                strict: bool, max_line: int = MAX_LINE_BYTES):
    """Stream every input and keep a reservoir sample of sentences. Returns (sentences, info)."""
    if max_sentence_length < MIN_SENTENCE_BYTES:
        raise UserError(f"--max-sentence-length must be at least {MIN_SENTENCE_BYTES} bytes (one character), "
                        f"not {max_sentence_length}")
    paths = corpus.expand_inputs(inputs)
    stats = corpus.CorpusStats()
    res = Reservoir(max_sentences, seed)
    any_gz = any(str(p).lower().endswith(".gz") for p in paths)  # sizes on disk are compressed
    prog = Progress("reading", total_bytes=0 if any_gz else corpus.total_size(paths), logger=log)
    chars = 0
    per_file = []
    for path in paths:
        before = (stats.documents, res.seen, stats.bytes)
        for doc in corpus.iter_documents(path, text_field=text_field, strict=strict, stats=stats,
                                         max_line=max_line):
            for sent in split_sentences(doc, max_sentence_length):
                res.add(sent)
                chars += len(sent)
            prog.update(1, 0)
        prog.update(0, stats.bytes - before[2])
        if stats.documents == before[0]:
            raise InputError(path, "holds no text (no non-empty line or document)")
        per_file.append({"path": str(path), "documents": stats.documents - before[0],
                         "sentences": res.seen - before[1]})
    prog.done()
    if stats.skipped():
        log.warning("skipped %d bad lines (%s)", stats.skipped(), "; ".join(stats.first_problems))
    info = {"files": per_file, "corpus": stats.as_dict(), "sentences_seen": res.seen,
            "sentences_sampled": len(res.items), "characters_seen": chars,
            "sampled": res.seen > len(res.items)}
    return res.items, info, paths


def _trainer_error(e: Exception, vocab_size: int, paths) -> UserError:
    msg = str(e)
    names = ", ".join(str(p) for p in paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return UserError(f"{names}: --vocab-size {vocab_size} is larger than this corpus supports "
                         f"(at most {m.group(2)} pieces); use more text or a smaller --vocab-size")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return UserError(f"{names}: --vocab-size {vocab_size} is smaller than the {m.group(2)} characters, "
                         f"bytes and special pieces the model must hold; raise --vocab-size or lower "
                         f"--character-coverage")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return UserError(f"{names}: sentencepiece training failed: {first}")


def train(inputs, out_dir, *, vocab_size=20000, model_type="bpe", character_coverage=0.9995,
          max_sentences=2_000_000, max_sentence_length=4192, threads=None, seed=42, use_jieba=False,
          text_field="text", strict=True, overwrite=False, max_line=MAX_LINE_BYTES) -> dict:
    """Train `out_dir/zh_sp.model` on `inputs`; returns the training config that is written next to it."""
    import sentencepiece as spm

    if vocab_size < 1:
        raise UserError(f"--vocab-size must be positive, not {vocab_size}")
    if max_sentences < 1:
        raise UserError(f"--max-sentences must be positive, not {max_sentences}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output exists; pass --overwrite to replace it")
    threads = threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    sentences, info, paths = read_sample(inputs, max_sentences=max_sentences,
                                         max_sentence_length=max_sentence_length, seed=seed,
                                         text_field=text_field, strict=strict, max_line=max_line)
    t_read = time.perf_counter() - t0
    log.info("%d sentences read, %d kept for training (%.1fs)", info["sentences_seen"],
             info["sentences_sampled"], t_read)

    settings = dict(LLAMA_SETTINGS, model_type=model_type, vocab_size=vocab_size,
                    character_coverage=character_coverage, num_threads=threads,
                    max_sentence_length=max_sentence_length + (max_sentence_length // 2 if use_jieba else 0),
                    input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    t_seg = 0.0
    if use_jieba:
        t1 = time.perf_counter()
        sentences = jieba_segment(sentences, processes=threads)
        settings["pretokenization_delimiter"] = DELIMITER
        t_seg = time.perf_counter() - t1
        log.info("jieba segmentation: %.1fs", t_seg)

    t2 = time.perf_counter()
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **settings)
    except RuntimeError as e:
        raise _trainer_error(e, vocab_size, paths) from None
    t_train = time.perf_counter() - t2
    model = buf.getvalue()
    proto = _spm.load_proto(model, "trained model")

    config = {
        "command": "zhllama vocab train",
        "inputs": [str(x) for x in inputs],
        "files": info["files"],
        "settings": {k: v for k, v in settings.items() if k != "minloglevel"},
        "sampling": {"max_sentences": max_sentences, "seed": seed, "sentences_seen": info["sentences_seen"],
                     "sentences_sampled": info["sentences_sampled"], "sampled": info["sampled"],
                     "characters_seen": info["characters_seen"]},
        "jieba": bool(use_jieba),
        "text_field": text_field,
        "corpus": info["corpus"],
        "pieces": len(proto.pieces),
        "seconds": {"read": round(t_read, 3), "jieba": round(t_seg, 3), "train": round(t_train, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "versions": _versions(),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        (tmp / f"{MODEL_NAME}.model").write_bytes(model)
        with open(tmp / f"{MODEL_NAME}.vocab", "w", encoding="utf-8") as f:
            for p in proto.pieces:
                f.write(f"{p.piece}\t{p.score:g}\n")
        config["model_sha256"] = sha256_file(tmp / f"{MODEL_NAME}.model")
        atomic_write_json(tmp / "train_config.json", config)
    log.info("wrote %s/%s.model (%d pieces) in %.1fs", out_dir, MODEL_NAME, len(proto.pieces),
             config["seconds"]["total"])
    return config


def _versions() -> dict:
    out = {}
    for name in ("sentencepiece", "jieba"):
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out


def run(args) -> int:
    # One writer per --out, and --out checked writable before the corpus is read and trained on.
    with output_lock(args.out, "zhllama vocab train", "tokenizer"):
        return _run(args)


def _run(args) -> int:
    common = dict(vocab_size=args.vocab_size, max_sentences=args.max_sentences,
                  max_sentence_length=args.max_sentence_length, seed=args.seed, text_field=args.text_field,
                  strict=not args.skip_bad_lines, overwrite=args.overwrite, max_line=max_line_bytes(args))
    if getattr(args, "base", None):
        from zhllama.vocab import bpe_train  # here, not at the top: bpe_train imports this module

        if args.jieba or args.model_type != "bpe":
            raise UserError("--base (byte-level BPE) takes neither --jieba nor --model-type unigram")
        cfg = bpe_train.train(args.input, args.out, base=args.base, **common)
        what, written = "byte-level BPE tokens", Path(args.out) / "tokenizer.json"
    else:
        cfg = train(args.input, args.out, model_type=args.model_type, character_coverage=args.character_coverage,
                    threads=args.threads, use_jieba=args.jieba, **common)
        what, written = "pieces", Path(args.out) / (MODEL_NAME + ".model")
    s = cfg["sampling"]
    print(f"trained {cfg['pieces']:,} {what} on {s['sentences_sampled']:,} of {s['sentences_seen']:,} sentences "
          f"in {cfg['seconds']['total']:.1f}s -> {written}")
    return 0


def load_config(out_dir) -> dict:
    with open(Path(out_dir) / "train_config.json", encoding="utf-8") as f:
        return json.load(f)
