"""Input files that are not plain files, BOMs, and lines too long to read (issue 24, input files).

Every class of odd file (a FIFO, a character or block device, a socket, a symbolic link loop, a
dangling link, an unreadable file, a directory where a file is expected) is crossed with every command
that reads that kind of input, named directly and found inside an input folder: one line naming the
path and what it is, exit 2, no traceback, no output. The commands run in-process (`cli.main`), as in
test_bad_input.py; a FIFO is opened for writing by a helper thread the whole time, so that a reader
that opens it anyway (the bug) ends instead of hanging the suite. Unreadable files need a user the
permission bits apply to: as root those cases run the CLI as `nobody` (tests/fsfaults.py).

Lines, records and fields too long are refused naming file and line; the cases that used to take
gigabytes or never end (a 64 MB line in `data pack` and `vocab train`, a 99 MB SFT record,
`--max-sentence-length 0`) run in a child capped in memory and time (tests/bounded.py).
A UTF-8 BOM is not content: packs, SFT conversions, seed tasks, translations, templates and benchmark
CSVs read with and without one are equal.
"""

import gzip
import json
import os
import random
import re
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bounded import ZHLLAMA, run_bounded
from fsfaults import as_nobody, fifo_unblocker, make_readable, world_dir
from zhllama.app.cli import main as cli_main
from zhllama.sft.convert import main as convert_main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "zhllama" / "data" / "zh_sample.txt"
SFT_SAMPLE = REPO / "zhllama" / "data" / "sft_zh.jsonl"
API = ["--api-base", "http://127.0.0.1:9/v1", "--model", "m"]   # never reached: input is refused first
BOM = b"\xef\xbb\xbf"
SEED = {"instruction": "给出下面词语的同义词", "instances": [{"input": "惊人地", "output": "令人惊奇地"}]}
CMMLU_HEADER = ",Question,A,B,C,D,Answer"


# ----------------------------------------------------------------------------- odd files

def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _char_device(p: Path) -> None:
    os.symlink("/dev/null", p)          # in-process: a reader without the check reads nothing (see
                                        # test_dev_zero_is_refused_in_bounded_memory for endless zeros)


def _block_device(p: Path) -> None:
    try:
        os.mknod(p, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    except PermissionError:
        pytest.skip("creating a block device node needs CAP_MKNOD, which this process lacks")


def _socket(p: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="zs", dir="/tmp"))   # AF_UNIX paths are limited to 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(short / "s"))
            os.rename(short / "s", p)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _loop(p: Path) -> None:
    os.symlink(p.name, p)


def _dangling(p: Path) -> None:
    os.symlink("no-such-target", p)


def _unreadable(p: Path) -> None:
    p.write_text("今天天气很好。\n", encoding="utf-8")
    p.chmod(0)


def _directory(p: Path) -> None:
    p.mkdir()
    (p / "x.jsonl").write_text(json.dumps(SEED, ensure_ascii=False) + "\n", encoding="utf-8")


# kind -> (maker, what the error line must say)
KINDS = {
    "fifo": (_fifo, "named pipe (FIFO)"),
    "char-device": (_char_device, "character device"),
    "block-device": (_block_device, "block device"),
    "socket": (_socket, "is a socket"),
    "symlink-loop": (_loop, "symbolic link loop"),
    "dangling-link": (_dangling, "dangling symbolic link"),
    "unreadable": (_unreadable, "permission denied"),
    "directory": (_directory, "is a directory"),     # only where one file is expected
}

# command -> (argv builder (input, tokenizer, model, out dir), suffix of the odd file, reads folders?)
COMMANDS = {
    "vocab train": (lambda p, t, m, o: ["vocab", "train", "--input", p, "--out", o / "out", "--vocab-size", "60"],
                    ".txt", True),
    "vocab report": (lambda p, t, m, o: ["vocab", "report", "--tokenizer", t, "--text", p], ".txt", True),
    "data pack": (lambda p, t, m, o: ["data", "pack", "--tokenizer", t, "--input", p, "--out", o / "out",
                                      "--workers", "1"], ".txt", True),
    "eval": (lambda p, t, m, o: ["eval", "--model", m, "--text", p, "--device", "cpu"], ".txt", True),
    "sft.convert": (lambda p, t, m, o: ["sft.convert", p, "--out", o / "out.jsonl"], ".jsonl", True),
    "selfinstruct": (lambda p, t, m, o: ["selfinstruct", "--seed-tasks", p, "--out", o / "out.jsonl", "--num", "2",
                                         *API], ".jsonl", False),
    "translate": (lambda p, t, m, o: ["translate", "--input", p, "--out", o / "out.jsonl", *API], ".jsonl", False),
    "eval --benchmark": (lambda p, t, m, o: ["eval", "--model", m, "--benchmark", "cmmlu", "--data", p,
                                             "--device", "cpu"], ".csv", "benchmark"),
    "train --config": (lambda p, t, m, o: ["train", "--dry-run", "--config", p], ".yaml", False),
}


def _cases():
    cases = []
    for kind in KINDS:
        for command, (_, _, folders) in COMMANDS.items():
            if kind == "directory" and folders is not False:
                continue        # a directory is a valid input of the commands that read folders
            if folders == "benchmark":
                cases.append((kind, command, "in-folder"))    # the CSVs are always found in --data
                continue
            cases.append((kind, command, "named"))
            if folders:
                cases.append((kind, command, "in-folder"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def world(tiny_tokenizer_dir, tiny_model_dir):
    """A folder every user may read (the unreadable cases run as `nobody` under root) holding copies of
    the tiny tokenizer and model."""
    with world_dir("zhllama-badfiles-") as root:
        shutil.copytree(tiny_tokenizer_dir, root / "tok")
        shutil.copytree(tiny_model_dir, root / "model")
        make_readable(root)
        yield root


def _run_in_process(argv):
    argv = [str(a) for a in argv]
    try:
        if argv[0] == "sft.convert":
            return convert_main(argv[1:])
        return cli_main(argv)
    except SystemExit as e:
        return e.code


def _place(kind, command, where, case_dir: Path) -> tuple:
    """(the path given to the command, the odd path the error must name)."""
    maker, _ = KINDS[kind]
    suffix, folders = COMMANDS[command][1], COMMANDS[command][2]
    if folders == "benchmark":
        data = case_dir / "cmmlu"
        (data / "test").mkdir(parents=True)
        odd = data / "test" / "agronomy.csv"
        maker(odd)
        return data, odd
    if where == "named":
        odd = case_dir / f"odd{suffix}"
        maker(odd)
        return odd, odd
    folder = case_dir / "corpus"
    folder.mkdir()
    good = SFT_SAMPLE if suffix == ".jsonl" else SAMPLE
    shutil.copy(good, folder / f"a_good{suffix}")
    odd = folder / f"odd{suffix}"
    maker(odd)
    return folder, odd


@pytest.mark.parametrize("case", CASES, ids=[f"{k} | {c} | {w}" for k, c, w in CASES])
def test_odd_file_is_one_line_exit_2(case, world, capsys):
    kind, command, where = case
    case_dir = Path(tempfile.mkdtemp(dir=world))    # removed with `world`, whatever the modes inside
    case_dir.chmod(0o777)
    given, odd = _place(kind, command, where, case_dir)
    argv = COMMANDS[command][0](given, world / "tok", world / "model", case_dir)
    if kind == "unreadable" and os.geteuid() == 0:
        py_argv = [*ZHLLAMA, *argv] if argv[0] != "sft.convert" else \
            [sys.executable, "-m", "zhllama.sft.convert", *argv[1:]]
        res = run_bounded(as_nobody(py_argv), max_rss_mb=1500, timeout_s=120, cwd=case_dir)
        line = res.assert_one_line_error(str(odd))
    else:
        with fifo_unblocker([odd] if kind == "fifo" else []):
            code = _run_in_process(argv)
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, f"exit {code}\n{err[-3000:]}"
        line = errors[0]
        assert str(odd) in line, line
    assert KINDS[kind][1] in line, line
    left = [p.name for p in case_dir.iterdir() if p.name.startswith(("out", ".out"))]
    assert left == [], f"left {left}"


# ----------------------------------------------------------------------------- lines too long

def _one_line_file(path: Path, mb: int) -> Path:
    """A file that is one line of `mb` MB of Chinese text with sentence punctuation, no newline."""
    unit = "今天天气很好，我们去公园散步。" * 1000
    block = unit.encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(mb * 1_000_000 // len(block) + 1):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def line_64mb(tmp_path_factory) -> Path:
    return _one_line_file(tmp_path_factory.mktemp("long") / "one_line.txt", 64)


def test_64mb_line_in_data_pack_is_refused_in_bounded_memory(line_64mb, tiny_tokenizer_dir, tmp_path):
    """Before: > 4 GB for a 256 MB line (the whole line decoded, tokenized into a list of ints)."""
    res = run_bounded([*ZHLLAMA, "data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", line_64mb,
                       "--out", tmp_path / "out", "--workers", "1"], max_rss_mb=600, timeout_s=120)
    line = res.assert_one_line_error(f"{line_64mb}:1", "--max-line-mb")
    assert "longer than 16 MB" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_64mb_line_in_vocab_train_is_refused_in_bounded_memory(line_64mb, tmp_path):
    res = run_bounded([*ZHLLAMA, "vocab", "train", "--input", line_64mb, "--out", tmp_path / "out",
                       "--vocab-size", "60"], max_rss_mb=600, timeout_s=120)
    res.assert_one_line_error(f"{line_64mb}:1", "--max-line-mb")
    assert not (tmp_path / "out").exists()


def test_max_sentence_length_zero_is_refused(tmp_path):
    """Before: an endless loop (a hard cut of 0 bytes makes no progress)."""
    res = run_bounded([*ZHLLAMA, "vocab", "train", "--input", SAMPLE, "--out", tmp_path / "out",
                       "--max-sentence-length", "0"], max_rss_mb=600, timeout_s=60)
    res.assert_one_line_error("--max-sentence-length", "at least 4")


def test_99mb_sft_record_is_skipped_or_refused_in_bounded_memory(tmp_path):
    """Before: tokenizing a record that size in `train` took gigabytes (a 25 MB one: 3.6 GB, 107 s)."""
    src = tmp_path / "big.jsonl"
    good = [json.dumps({"instruction": f"问题{i}", "output": "回答"}, ensure_ascii=False) for i in range(3)]
    with open(src, "w", encoding="utf-8") as f:
        f.write(good[0] + "\n")
        f.write('{"instruction": "大", "output": "' + "数据" * (33 * 1024 * 1024 // 2) + '"}\n')
        f.write(good[1] + "\n" + good[2] + "\n")
    convert = [sys.executable, "-m", "zhllama.sft.convert"]
    res = run_bounded([*convert, src, "--out", tmp_path / "strict.jsonl", "--strict"], max_rss_mb=1200,
                      timeout_s=120)
    res.assert_one_line_error(f"{src}:2", "--max-record-mb")
    assert not (tmp_path / "strict.jsonl").exists()
    res = run_bounded([*convert, src, "--out", tmp_path / "out.jsonl"], max_rss_mb=1200, timeout_s=120)
    assert res.returncode == 0 and res.killed is None, res.describe()
    want = [json.dumps({"instruction": f"问题{i}", "input": "", "output": "回答"}, ensure_ascii=False)
            for i in range(3)]
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines() == want
    assert "too_large=1" in res.stderr and f"{src}:2: record longer than 2 MB" in res.stderr


@pytest.mark.parametrize("reader", ["range", "whole"])
def test_a_long_line_is_named_by_both_readers(tmp_path, reader):
    """The byte-range reader (uncompressed files, in slices) and the line reader (.gz) name the same
    line: line 7 of 9 is 3,000 bytes, the limit 1,000; the other lines are short."""
    from zhllama import corpus
    from zhllama.errors import InputError
    lines = [f"第{i}行" for i in range(9)]
    lines[6] = "长" * 1000                       # 3,000 bytes
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    path = tmp_path / ("a.txt" if reader == "range" else "a.txt.gz")
    path.write_bytes(raw if reader == "range" else gzip.compress(raw))
    with pytest.raises(InputError) as e:
        if reader == "range":
            list(corpus.iter_lines_range(path, 0, len(raw), chunk_bytes=4096, max_line=1000))
        else:
            list(corpus.iter_lines(path, max_line=1000))
    assert f"{path}:7: line longer than 0.001 MB" in str(e.value)
    # at the limit exactly, not refused: 3,000 bytes with a limit of 3,000
    if reader == "range":
        got = [t for _, t in corpus.iter_lines_range(path, 0, len(raw), chunk_bytes=4096, max_line=3000)]
    else:
        got = [t for _, t in corpus.iter_lines(path, max_line=3000)]
    assert got == lines


@pytest.mark.parametrize("command", ["vocab train", "vocab report", "data pack", "eval"])
def test_long_line_is_one_line_in_every_corpus_command(command, tiny_tokenizer_dir, tiny_model_dir, tmp_path,
                                                       capsys):
    src = tmp_path / "long.txt"
    src.write_text("短的一行。\n" * 5 + "很长的一行。" * 200_000 + "\n", encoding="utf-8")   # line 6: 3.6 MB
    argv = COMMANDS[command][0](src, tiny_tokenizer_dir, tiny_model_dir, tmp_path)
    assert _run_in_process([*argv, "--max-line-mb", "1"]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if "error:" in x]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"{src}:6: line longer than 1 MB" in errors[0] and "--max-line-mb" in errors[0]


def test_a_paragraph_without_blank_lines_is_bounded_too(tiny_tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "para.txt"
    src.write_text("第一段。\n\n" + "没有空行的一行。\n" * 100_000, encoding="utf-8")   # 2.5 MB from line 3
    assert _run_in_process(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", src, "--out",
                            tmp_path / "out", "--doc-sep", "blank", "--max-line-mb", "1", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: paragraph" in err and "--max-line-mb" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_pack_work_sizes_must_be_finite(value, tiny_tokenizer_dir, tmp_path, capsys):
    """`--unit-mb nan` passed the `<= 0` check and failed in int(nan) with a traceback."""
    assert _run_in_process(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", SAMPLE, "--out",
                            tmp_path / "out", "--unit-mb", value]) == 2
    err = capsys.readouterr().err
    assert "--unit-mb and --slice-mb must be positive numbers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_seed_task_field_and_record_limits(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    big = dict(SEED, instruction="很长" * 15_000)                        # 30,000 characters
    seeds.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in (SEED, big)) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert _run_in_process(["selfinstruct", "--seed-tasks", seeds, "--out", out, "--num", "2", *API]) == 2
    err = capsys.readouterr().err
    assert f"{seeds}:2: 'instruction' has 30,000 characters" in err and "Traceback" not in err
    huge = dict(SEED, instances=[{"input": "", "output": "长" * 1_000_000}])   # a 3 MB record
    seeds.write_text(json.dumps(huge, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _run_in_process(["selfinstruct", "--seed-tasks", seeds, "--out", out, "--num", "2", *API]) == 2
    err = capsys.readouterr().err
    assert f"{seeds}:1: line longer than 2 MB" in err and "--max-record-mb" in err
    for fmt in ("lines", "array"):
        records = [{"instruction": "翻译", "output": "好"}, {"instruction": "长" * 1_000_000}]
        src = tmp_path / f"in_{fmt}.json"
        src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) if fmt == "lines"
                       else json.dumps(records, ensure_ascii=False), encoding="utf-8")
        assert _run_in_process(["translate", "--input", src, "--out", out, *API]) == 2
        err = capsys.readouterr().err
        where = f"{src}:2: line" if fmt == "lines" else f"{src}:record 2: record"
        assert f"{where} longer than 2 MB" in err and "--max-record-mb" in err, err
    assert not out.exists()


_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")


def reference_split_sentences(text, max_bytes):
    """`vocab train`'s sentence splitting as it was before issue 24, kept as the reference: plain, and
    quadratic in a line's length (each step re-encodes what it has gathered; bench/split_sentences.py
    times it against the linear rewrite)."""
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        buf = ""
        for part in _SENTENCE_END.split(line):
            if len((buf + part).encode("utf-8")) <= max_bytes:
                buf += part
                continue
            if buf.strip():
                yield buf
            buf = part
            while len(buf.encode("utf-8")) > max_bytes:
                cut = buf.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield cut
                buf = buf[len(cut):]
        if buf.strip():
            yield buf


def test_split_sentences_equals_the_plain_reference():
    """The linear rewrite cuts exactly as the reference: at sentence punctuation, then hard cuts on
    character boundaries, with 1- to 4-byte characters; below 4 bytes (a hard cut could make no
    progress: the endless loop of `--max-sentence-length 0`) it refuses."""
    from zhllama.vocab.train import split_sentences
    rng = random.Random(0)
    alphabet = list("abc xyz") + list("中文字词") + ["é", "ß", "😀", "𠀀"] + list("。！？;…") + ["\n"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        for max_bytes in (4, 5, 7, 16, 61):
            assert list(split_sentences(text, max_bytes)) == list(reference_split_sentences(text, max_bytes)), \
                (text, max_bytes)
    with pytest.raises(ValueError):
        list(split_sentences("x" * 10, 3))


# ----------------------------------------------------------------------------- BOMs are not content

def _pack_tokens(tok, inputs, out, *extra):
    from zhllama.pretrain.shards import PackedBlocks
    assert cli_main(["data", "pack", "--tokenizer", str(tok), "--input", *map(str, inputs), "--out", str(out),
                     "--workers", "1", "--block-size", "16", "--validation-ratio", "0", *extra]) == 0
    blocks = PackedBlocks(out)
    return np.stack([blocks[i] for i in range(len(blocks))])


def test_bom_is_not_content_in_text_jsonl_and_gz_packs(tiny_tokenizer_dir, tmp_path):
    text = SAMPLE.read_bytes()
    jsonl = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n"
                    for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:50]).encode("utf-8")
    for name, body in (("a.txt", text), ("b.jsonl", jsonl)):
        for d, prefix in (("plain", b""), ("bom", BOM)):
            (tmp_path / d).mkdir(exist_ok=True)
            (tmp_path / d / name).write_bytes(prefix + body)
            (tmp_path / d / (name + ".gz")).write_bytes(gzip.compress(prefix + body))
    for name in ("a.txt", "b.jsonl", "a.txt.gz", "b.jsonl.gz"):
        plain = _pack_tokens(tiny_tokenizer_dir, [tmp_path / "plain" / name], tmp_path / f"p-{name}", "--strict")
        bom = _pack_tokens(tiny_tokenizer_dir, [tmp_path / "bom" / name], tmp_path / f"b-{name}", "--strict")
        assert np.array_equal(plain, bom), name        # before: JSON line 1 "not valid JSON", txt: a BOM token


def test_bom_is_not_content_in_sft_seed_translate_template_and_csv(tmp_path):
    from zhllama.export.benchmark import CMMLU, read_questions
    from zhllama.sft.records import load_records
    from zhllama.sft.selfinstruct import load_seed_tasks
    from zhllama.sft.templates import get_template
    from zhllama.sft.translate import load_records as load_translate

    rows = [json.loads(x) for x in SFT_SAMPLE.read_text(encoding="utf-8").splitlines()[:4]]
    bodies = {"lines.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
              "array.json": json.dumps(rows, ensure_ascii=False)}
    for name, body in bodies.items():
        plain, bom = tmp_path / f"plain_{name}", tmp_path / f"bom_{name}"
        plain.write_text(body, encoding="utf-8")
        bom.write_bytes(BOM + body.encode("utf-8"))
        a, sa = load_records([plain], strict=True)
        b, sb = load_records([bom], strict=True)
        assert [r.messages() for r in a] == [r.messages() for r in b] and len(b) == 4, name
        assert load_translate(plain, ("instruction", "output")) == load_translate(bom, ("instruction", "output"))
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(BOM + (json.dumps(SEED, ensure_ascii=False) + "\n").encode("utf-8"))
    assert load_seed_tasks(seeds) == [{"instruction": SEED["instruction"], "input": "惊人地", "output": "令人惊奇地"}]
    tpl = tmp_path / "mine.json"
    tpl.write_bytes(BOM + json.dumps({"name": "mine", "prompt_no_input": "问：{instruction}\n答："}).encode("utf-8"))
    assert get_template(tpl).name == "mine"
    csv_file = tmp_path / "agronomy.csv"
    csv_file.write_bytes(BOM + (CMMLU_HEADER + "\n0,土地是农业的基本生产资料吗,是,否,不一定,无法判断,A\n").encode("utf-8"))
    q = read_questions(csv_file, CMMLU)
    assert [(x.question, x.answer) for x in q] == [("土地是农业的基本生产资料吗", "A")]


@pytest.mark.parametrize("command", ["sft.convert", "data pack"])
def test_dev_zero_is_refused_in_bounded_memory(command, tiny_tokenizer_dir, tmp_path):
    """Endless zeros behind an input's name (before: `sft.convert` read it whole, without end)."""
    zero = tmp_path / "zero.jsonl"
    os.symlink("/dev/zero", zero)
    argv = ([sys.executable, "-m", "zhllama.sft.convert", zero, "--out", tmp_path / "out.jsonl"]
            if command == "sft.convert" else
            [*ZHLLAMA, "data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", zero, "--out", tmp_path / "out"])
    res = run_bounded(argv, max_rss_mb=600, timeout_s=60)
    res.assert_one_line_error(str(zero), "character device")


def test_console_script_fifo_is_one_line_in_a_real_process(tmp_path):
    """The same as a user meets it: a real process, `--input <(zcat ...)` style (a pipe), bounded."""
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    with fifo_unblocker([fifo]):
        res = run_bounded([*ZHLLAMA, "vocab", "train", "--input", fifo, "--out", tmp_path / "out"],
                          max_rss_mb=600, timeout_s=60)
    res.assert_one_line_error(str(fifo), "named pipe (FIFO)")

