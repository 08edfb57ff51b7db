"""`zhllama data pack`: round trip, determinism, resume, up-to-date, validation split, bad input.

A tiny SentencePiece BPE model (byte fallback, identity normalization so decoding gives the text back)
is trained once per session on text the test writes; ../shared is only used by the last test.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import random

import numpy as np
import pytest

from zhllama.errors import UserError
from zhllama.pretrain import pack, shards

from conftest import run_cli, shared_path

ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下"
EN = ["model", "token", "data", "train", "the", "of", "and", "LLaMA", "block", "text"]
PUNCT = "，。！？"


def make_docs(n, seed=0, min_len=3, max_len=60):
    """Deterministic mixed Chinese/English documents with no leading/trailing whitespace."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(min_len, max_len)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(ZH))
            elif r < 0.85:
                parts.append(rng.choice(PUNCT))
            else:
                parts.append(" " + rng.choice(EN) + " ")
        docs.append("".join(parts).strip() or "中")
    return docs


def train_tiny_sp(out_dir, vocab_size=400, seed_text=None):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(seed_text or make_docs(3000, seed=123)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_sp(tmp_path_factory):
    return train_tiny_sp(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def sp(tiny_sp):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tiny_sp))


def write_lines(path, docs):
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return path


def do_pack(tok, inputs, out, *extra, block_size=64):
    args = ["data", "pack", "--tokenizer", tok, "--input", *inputs, "--out", out,
            "--block-size", block_size, *extra]
    return run_cli(*args)


def expected_stream(sp, docs):
    ids = sp.encode(docs, add_bos=True, add_eos=True)
    return np.array([t for x in ids for t in x], dtype=np.int64)


def unit_streams(out, split="train"):
    return [np.asarray(a, dtype=np.int64) for _, a in shards.iter_unit_streams(out, split)]


def expected_blocks(out, split, bs):
    """Blocks the format promises: each unit's full blocks, then the concatenated tails cut again."""
    blocks, tails = [], []
    for e, a in shards.iter_unit_streams(out, split):
        a = np.asarray(a, dtype=np.int64)
        nb = e["blocks"]
        blocks.extend(a[:nb * bs].reshape(nb, bs))
        tails.append(a[nb * bs:])
    tail = np.concatenate(tails) if tails else np.empty(0, np.int64)
    nt = len(tail) // bs
    blocks.extend(tail[:nt * bs].reshape(nt, bs))
    return blocks, len(tail) - nt * bs


def decode_docs(sp, stream):
    """Split a token stream at BOS ... EOS and decode each document."""
    bos, eos = sp.bos_id(), sp.eos_id()
    cuts = np.flatnonzero(stream == eos)
    docs, start = [], 0
    for c in cuts:
        seg = stream[start:c + 1]
        assert seg[0] == bos and seg[-1] == eos
        docs.append(sp.decode(seg[1:-1].tolist()))
        start = c + 1
    assert start == len(stream)
    return docs


@contextlib.contextmanager
def interrupted_after(units: int):
    """Packs in this block stop with Ctrl-C (KeyboardInterrupt) once `units` units are recorded."""
    seen = []

    def interrupt(unit):
        seen.append(unit.index)
        if len(seen) == units:
            raise KeyboardInterrupt

    pack.Packer.after_unit = interrupt
    try:
        yield
    finally:
        pack.Packer.after_unit = None


def snapshot(out):
    """name -> (size, mtime_ns, inode) of every file in the pack dir."""
    res = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            st = os.stat(p)
            res[os.path.relpath(p, out)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return res


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("data", "pack", "--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--block-size" in out and "--validation-ratio" in out and "resume" in out


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_range_reader_matches_whole_file_reader(tmp_path, chunk):
    """corpus.iter_lines_range over consecutive ranges == corpus.iter_lines over the file: same lines,
    numbers, skipped bad lines, CRLF handling, a last line without newline."""
    from zhllama import corpus
    raw = ("一行\r\n第二行 text\n\n" * 5).encode() + b"\xff bad\n" + ("尾巴\n" * 7).encode() + b"last"
    f = tmp_path / "r.txt"
    f.write_bytes(raw)
    whole_stats, range_stats = corpus.CorpusStats(), corpus.CorpusStats()
    want = list(corpus.iter_lines(f, stats=whole_stats))
    cuts = [0] + [i + 1 for i, b in enumerate(raw) if b == 10][3::4] + [len(raw)]
    got = []
    for a, b in zip(cuts, cuts[1:]):
        first = raw[:a].count(b"\n") + 1
        got += list(corpus.iter_lines_range(f, a, b, first, stats=range_stats, chunk_bytes=chunk))
    assert got == want
    assert (range_stats.bytes, range_stats.bad_utf8) == (whole_stats.bytes, 1)
    assert range_stats.first_problems == whole_stats.first_problems


def test_round_trip_multi_unit(tiny_sp, sp, tmp_path):
    """Blocks decode to the corpus; only one final partial block per split is dropped."""
    docs_a, docs_b = make_docs(700, seed=1), make_docs(300, seed=2)
    a = write_lines(tmp_path / "a.txt", docs_a)
    b = write_lines(tmp_path / "b.txt", docs_b)
    out = tmp_path / "pack"
    bs = 64
    # tiny units and slices: several units per file, several slices per unit
    assert do_pack(tiny_sp, [a, b], out, "--unit-mb", "0.02", "--slice-mb", "0.004",
                   "--workers", "1", "--validation-ratio", "0", block_size=bs) == 0
    m = shards.read_manifest(out)
    index = json.loads((out / "index.json").read_text())
    assert len([e for e in index["splits"]["train"]["shards"] if e.get("role") != "tail"]) >= 4

    # 1. the unit streams, concatenated, are exactly the documents with BOS/EOS, in input order
    stream = np.concatenate(unit_streams(out))
    np.testing.assert_array_equal(stream, expected_stream(sp, docs_a + docs_b))
    assert decode_docs(sp, stream) == docs_a + docs_b

    # 2. the blocks are those units cut as promised, and the only loss is the final partial block
    ds = shards.PackedBlocks(out, expect_tokenizer=tiny_sp, expect_block_size=bs)
    want, dropped = expected_blocks(out, "train", bs)
    assert len(ds) == len(want) > 0
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], want[i])
    c = m["counts"]["splits"]["train"]
    assert c["dropped_tokens"] == dropped < bs
    assert c["tokens"] == len(stream) == c["blocks"] * bs + c["dropped_tokens"]
    assert c["blocks"] == len(ds)
    assert c["documents"] == len(docs_a) + len(docs_b) == m["counts"]["input"]["documents"]
    assert m["tokenizer"]["fingerprint"] == shards.tokenizer_fingerprint(tiny_sp)
    assert [s["size"] for s in m["sources"]] == [a.stat().st_size, b.stat().st_size]
    assert m["dtype"] == "<u2" and ds.dtype == np.uint16
    assert len(shards.PackedBlocks(out, split="validation")) == 0


def test_workers_and_slices_do_not_change_output(tiny_sp, tmp_path):
    docs = make_docs(1500, seed=3)
    src = write_lines(tmp_path / "c.txt", docs)
    outs = []
    for i, extra in enumerate([("--workers", "1", "--slice-mb", "1"),
                               ("--workers", "2", "--slice-mb", "0.003")]):
        out = tmp_path / f"p{i}"
        assert do_pack(tiny_sp, [src], out, "--unit-mb", "0.03", "--validation-ratio", "0.1",
                       *extra) == 0
        outs.append(out)
    for split in ("train", "validation"):
        d0, d1 = (shards.PackedBlocks(o, split=split) for o in outs)
        assert len(d0) == len(d1) > 0
        assert all(np.array_equal(d0[i], d1[i]) for i in range(len(d0)))


def test_validation_split_is_by_document(tiny_sp, sp, tmp_path):
    docs = make_docs(800, seed=4)
    docs = docs + docs[:50]                 # duplicates must land in the same split
    src = write_lines(tmp_path / "v.txt", docs)
    out = tmp_path / "pack"
    ratio = 0.2
    assert do_pack(tiny_sp, [src], out, "--validation-ratio", str(ratio), "--unit-mb", "0.02",
                   "--slice-mb", "0.005", "--workers", "1") == 0
    # The documented rule (docs/data.md), written out here: validation when the little-endian 64-bit
    # BLAKE2b hash of the UTF-8 text is below ratio x 2^64.
    def by_the_rule(d):
        return int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "little") < ratio * 2 ** 64

    val = [d for d in docs if by_the_rule(d)]
    train = [d for d in docs if not by_the_rule(d)]
    assert 0.1 < len(val) / len(docs) < 0.3
    assert decode_docs(sp, np.concatenate(unit_streams(out, "validation"))) == val
    assert decode_docs(sp, np.concatenate(unit_streams(out, "train"))) == train
    c = shards.read_manifest(out)["counts"]["splits"]
    assert (c["train"]["documents"], c["validation"]["documents"]) == (len(train), len(val))
    assert len(shards.PackedBlocks(out, split="validation")) == c["validation"]["blocks"] > 0


def test_rerun_is_up_to_date_and_changes_repack_only_their_units(tiny_sp, tmp_path, capsys):
    a = write_lines(tmp_path / "a.txt", make_docs(400, seed=5))
    b = write_lines(tmp_path / "b.txt", make_docs(400, seed=6))
    out = tmp_path / "pack"
    assert do_pack(tiny_sp, [a, b], out, "--workers", "1") == 0
    before = snapshot(out)
    capsys.readouterr()

    assert do_pack(tiny_sp, [a, b], out, "--workers", "1") == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before                      # nothing rewritten

    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))   # touched, same bytes
    assert do_pack(tiny_sp, [a, b], out, "--workers", "1") == 0
    after = snapshot(out)
    unit_files = [k for k in before if k.startswith("shards/") and not k.startswith("shards/tail")]
    assert all(after[k] == before[k] for k in unit_files)   # no unit re-tokenized

    write_lines(b, make_docs(450, seed=7))                  # b changed: only b's unit is redone
    assert do_pack(tiny_sp, [a, b], out, "--workers", "1") == 0
    after2 = snapshot(out)
    a_files = [k for k in before if os.path.basename(k).startswith("a.txt")]
    b_files = [k for k in before if os.path.basename(k).startswith("b.txt")]
    assert a_files and all(after2[k] == before[k] for k in a_files)
    assert b_files and not any(k in after2 for k in b_files)    # old b shards removed
    m = shards.read_manifest(out)
    assert m["counts"]["input"]["documents"] == 850
    assert m["sources"][1]["size"] == b.stat().st_size


def test_other_tokenizer_or_block_size_needs_overwrite(tiny_sp, tmp_path, capsys):
    src = write_lines(tmp_path / "a.txt", make_docs(300, seed=8))
    out = tmp_path / "pack"
    assert do_pack(tiny_sp, [src], out, "--workers", "1") == 0
    capsys.readouterr()
    assert do_pack(tiny_sp, [src], out, "--workers", "1", block_size=32) == 2
    err = capsys.readouterr().err
    assert "block_size 64 -> 32" in err and "--overwrite" in err
    assert shards.read_manifest(out)["block_size"] == 64     # untouched
    assert do_pack(tiny_sp, [src], out, "--workers", "1", "--overwrite", block_size=32) == 0
    assert shards.PackedBlocks(out, expect_block_size=32).block_size == 32


def test_interrupted_pack_resumes(tiny_sp, tmp_path, caplog):
    docs = make_docs(1200, seed=9)
    src = write_lines(tmp_path / "big.txt", docs)
    opts = ("--unit-mb", "0.02", "--slice-mb", "0.005", "--workers", "1")
    clean = tmp_path / "clean"
    assert do_pack(tiny_sp, [src], clean, *opts) == 0
    n_units = len(json.loads((clean / "index.json").read_text())["splits"]["train"]["shards"]) - 1
    assert n_units >= 3

    out = tmp_path / "pack"
    with interrupted_after(2):
        assert do_pack(tiny_sp, [src], out, *opts) == 130
    assert not (out / "manifest.json").exists()
    assert not list((out / "shards").glob(".*.tmp"))         # no half-written shard left
    with pytest.raises(UserError, match="interrupted"):
        shards.PackedBlocks(out)

    caplog.clear()
    with caplog.at_level("INFO", logger="zhllama.pack"):
        assert do_pack(tiny_sp, [src], out, *opts) == 0
    assert f"resumed: 2 of {n_units} unit(s)" in caplog.text
    a, b = shards.PackedBlocks(out), shards.PackedBlocks(clean)
    assert len(a) == len(b)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_blank_line_paragraphs_gz_and_jsonl(tiny_sp, sp, tmp_path):
    from zhllama import corpus
    paras = make_docs(300, seed=10, max_len=20)
    # paragraphs of 1-3 lines, separated by blank or whitespace-only (U+3000) lines
    text, want = [], []
    rng = random.Random(0)
    for i in range(0, len(paras) - 3, 3):
        lines = paras[i:i + rng.randint(1, 3)]
        want.append("\n".join(lines))
        text.append("\n".join(lines) + "\n" + rng.choice(["\n", "\u3000\n", "\n\n"]))
    para = tmp_path / "para.txt"
    para.write_text("".join(text), encoding="utf-8")
    gz_docs, js_docs = make_docs(50, seed=11), make_docs(60, seed=12)
    gz = tmp_path / "g.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(d + "\n\n" for d in gz_docs))      # --doc-sep blank applies here too
    js = tmp_path / "j.jsonl"
    js.write_text("".join(json.dumps({"content": d, "id": i}, ensure_ascii=False) + "\n"
                          for i, d in enumerate(js_docs)), encoding="utf-8")
    out = tmp_path / "pack"
    assert do_pack(tiny_sp, [para, gz, js], out, "--doc-sep", "blank", "--text-field", "content",
                   "--unit-mb", "0.004", "--slice-mb", "0.001", "--workers", "1",
                   "--validation-ratio", "0") == 0
    assert list(corpus.iter_documents(para, doc_sep="blank")) == want
    got = decode_docs(sp, np.concatenate(unit_streams(out)))
    assert got == want + gz_docs + js_docs


def test_parquet_input_in_row_groups(tiny_sp, sp, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (a dependency of datasets)")
    import pyarrow.parquet as pq
    pq_docs = make_docs(70, seed=13)
    pqf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": pq_docs}), pqf, row_group_size=20)
    out = tmp_path / "pack"
    assert do_pack(tiny_sp, [pqf], out, "--text-field", "content", "--unit-mb", "0.004", "--slice-mb", "0.001",
                   "--workers", "1", "--validation-ratio", "0") == 0
    assert decode_docs(sp, np.concatenate(unit_streams(out))) == pq_docs


def test_bad_input_counted_or_strict(tiny_sp, tmp_path, capsys):
    docs = make_docs(400, seed=14)
    raw = b"".join(d.encode("utf-8") + b"\n" for d in docs[:300])
    raw += b"\xff\xfe bad bytes\n" + b"   \n"                 # undecodable line 301, empty line 302
    raw += b"".join(d.encode("utf-8") + b"\n" for d in docs[300:])
    src = tmp_path / "bad.txt"
    src.write_bytes(raw)
    js = tmp_path / "bad.jsonl"
    js.write_text('{"text": "一个文档"}\n[1, 2]\n{"other": "x"}\n{"text": "两个文档"}\n',
                  encoding="utf-8")
    out = tmp_path / "pack"
    # lenient: counted and skipped, the lines named
    assert do_pack(tiny_sp, [src, js], out, "--slice-mb", "0.003", "--workers", "1",
                   block_size=16) == 0
    m = shards.read_manifest(out)
    c = m["counts"]["input"]
    assert (c["bad_utf8"], c["empty"], c["bad_json"], c["missing_field"]) == (1, 1, 1, 1)
    assert c["documents"] == 402
    problems = " ".join(c["first_problems"])
    assert f"{src}:301" in problems and f"{js}:2" in problems and f"{js}:3" in problems

    # strict: fails naming file and line (in a later slice), leaves no complete-looking output
    capsys.readouterr()
    out2 = tmp_path / "strict"
    assert do_pack(tiny_sp, [js, src], out2, "--strict", "--slice-mb", "0.003", "--workers", "1",
                   block_size=16) == 2
    err = capsys.readouterr().err
    assert f"{js}:2" in err and "not an object" in err and "Traceback" not in err
    assert not (out2 / "manifest.json").exists()
    assert not [p for p in (out2 / "shards").iterdir()]
    out3 = tmp_path / "strict3"
    assert do_pack(tiny_sp, [src], out3, "--strict", "--slice-mb", "0.003", "--workers", "1",
                   block_size=16) == 2
    err = capsys.readouterr().err
    assert f"{src}:301" in err and "UTF-8" in err
    assert not (out3 / "manifest.json").exists()
    with pytest.raises(UserError, match="interrupted or failed"):
        shards.PackedBlocks(out3)
    src.write_bytes(raw.replace(b"\xff\xfe", b"OK"))            # fixed: the same command now works
    assert do_pack(tiny_sp, [src], out3, "--strict", "--slice-mb", "0.003", "--workers", "1",
                   block_size=16) == 0
    assert shards.read_manifest(out3)["counts"]["input"]["documents"] == 401

    # a missing file or an empty one: refused before any work
    out4 = tmp_path / "missing"
    assert do_pack(tiny_sp, [src, tmp_path / "nope.txt"], out4, "--workers", "1") == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert do_pack(tiny_sp, [src, tmp_path / "empty.txt"], out4, "--workers", "1") == 2
    assert "empty.txt: file is empty" in capsys.readouterr().err
    assert not out4.exists() or not (out4 / "manifest.json").exists()


def test_too_little_text_and_bad_options(tiny_sp, tmp_path, capsys):
    src = write_lines(tmp_path / "a.txt", ["一个"])
    assert do_pack(tiny_sp, [src], tmp_path / "p", "--workers", "1", block_size=512) == 2
    assert "no complete block of 512" in capsys.readouterr().err
    assert do_pack(tiny_sp, [src], tmp_path / "q", "--validation-ratio", "1.5") == 2
    assert "--validation-ratio" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    assert do_pack(tiny_sp, [src], other, block_size=2) == 2
    assert "not empty" in capsys.readouterr().err
    assert do_pack(tmp_path / "nodir", [src], tmp_path / "r") == 2
    assert "no such tokenizer" in capsys.readouterr().err


def test_llama_tokenizer_on_shared_news(tmp_path):
    """Real LLaMA tokenizer, real Chinese text: the blocks decode back to the documents."""
    import sentencepiece as spm
    model = shared_path("data/llama/tokenizer.model")
    news = shared_path("data/zh/news_train.txt")
    docs = news.read_text(encoding="utf-8").splitlines()[:3000]
    src = write_lines(tmp_path / "news.txt", docs)
    out = tmp_path / "pack"
    assert do_pack(model, [src], out, "--workers", "1", "--validation-ratio", "0",
                   block_size=512) == 0
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ds = shards.PackedBlocks(out, expect_tokenizer=model, expect_block_size=512)
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    n = len(stream)
    np.testing.assert_array_equal(stream, expected_stream(sp, docs)[:n])
    dropped = shards.read_manifest(out)["counts"]["splits"]["train"]["dropped_tokens"]
    assert 0 <= len(expected_stream(sp, docs)) - n == dropped < 512
    cut = np.flatnonzero(stream == sp.eos_id())[-1] + 1
    assert decode_docs(sp, stream[:cut]) == docs[:len(decode_docs(sp, stream[:cut]))]
