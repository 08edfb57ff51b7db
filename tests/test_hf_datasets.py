"""Hugging Face datasets as inputs (issue 21, item 2): `data pack` and SFT read a folder written by
`save_to_disk`, parquet and Arrow files, and (online) a `hf://` Hub dataset.

The reference is always the same text written as JSON lines, read by the JSON reader that existed
before (and, for token streams, SentencePiece called directly). Datasets are built in the test with
`datasets.Dataset.from_dict`; nothing touches the network (HF_HUB_OFFLINE=1, conftest).
"""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")

from zhllama import corpus as corpus_module, hfdatasets
from zhllama.errors import InputError
from zhllama.modelio import load_tokenizer
from zhllama.pretrain import shards
from zhllama.pretrain.pack import plan
from zhllama.sft.dataset import SFTDataset
from zhllama.sft.convert import convert, main as convert_main
from zhllama.sft.records import load_records

from conftest import run_cli
from test_pack import (decode_docs, do_pack, expected_stream, interrupted_after, make_docs,  # noqa: F401
                       sp, tiny_sp)  # (sp, tiny_sp: fixtures)

# Index entry keys that name where a unit came from; everything else must be equal.
WHERE = ("file", "source", "start", "end", "range")


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n"
                            for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_arrow_stream(path, docs, batch_rows, writer=pa.ipc.new_stream):
    """An Arrow IPC stream (the format save_to_disk writes; `writer=pa.ipc.new_file`: the IPC file format,
    Feather v2) of record batches of `batch_rows` rows."""
    table = pa.table({"text": docs})
    with pa.OSFile(str(path), "wb") as sink, writer(sink, table.schema) as w:
        w.write_table(table, max_chunksize=batch_rows)
    return path


def shard_table(out):
    """Per split: (index entry without its source fields, shard file bytes), in index order."""
    index = json.loads((out / "index.json").read_text())
    return {s: [({k: v for k, v in e.items() if k not in WHERE}, (out / "shards" / e["file"]).read_bytes())
                for e in split["shards"]]
            for s, split in index["splits"].items()}


def assert_same_pack(a, b):
    """Byte-identical shard files, in the same order, and an equal index and counts."""
    ta, tb = shard_table(a), shard_table(b)
    assert ta.keys() == tb.keys()
    for s in ta:
        assert [e for e, _ in ta[s]] == [e for e, _ in tb[s]], s
        assert [raw for _, raw in ta[s]] == [raw for _, raw in tb[s]], s
    ma, mb = shards.read_manifest(a), shards.read_manifest(b)
    assert ma["counts"]["splits"] == mb["counts"]["splits"]
    for k in ("documents", "empty", "skipped"):      # not "bytes": JSON lines count their syntax too
        assert ma["counts"]["input"][k] == mb["counts"]["input"][k], k


PACK_OPTS = ("--validation-ratio", "0.1", "--workers", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three groups of documents as JSON lines (the reference) and as datasets of each kind."""
    d = tmp_path_factory.mktemp("corpus")
    a, b1, b2, c = (make_docs(n, seed=s) for n, s in ((150, 21), (90, 22), (70, 23), (120, 24)))
    held_out = make_docs(40, seed=25)
    ref = [write_jsonl(d / name, docs) for name, docs in
           (("a.jsonl", a), ("b1.jsonl", b1), ("b2.jsonl", b2), ("c.jsonl", c))]
    # a: a DatasetDict saved with save_to_disk; its "test" split must not be read
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": a, "id": list(range(len(a)))}),
                               "test": datasets.Dataset.from_dict({"text": held_out, "id": [0] * len(held_out)})})
    dd.save_to_disk(str(d / "a_saved"))
    # b1, b2: a folder of parquet files with several row groups each
    (d / "b_parquet").mkdir()
    pq.write_table(pa.table({"text": b1}), d / "b_parquet" / "part-0.parquet", row_group_size=25)
    pq.write_table(pa.table({"text": b2}), d / "b_parquet" / "part-1.parquet", row_group_size=25)
    # c: an Arrow stream file of several record batches
    write_arrow_stream(d / "c.arrow", c, 32)
    return {"dir": d, "ref": ref, "docs": (a, b1, b2, c), "held_out": held_out}


def test_datasets_pack_like_json_lines(corpus, tiny_sp, sp, tmp_path):
    """A save_to_disk DatasetDict (split train), a folder of parquet files and an Arrow file, alone
    and mixed with JSON lines, give the shards of the same text as JSON lines."""
    d = corpus["dir"]
    a, b1, b2, c = corpus["docs"]
    ref = tmp_path / "ref"
    assert do_pack(tiny_sp, corpus["ref"], ref, *PACK_OPTS) == 0
    # the reference holds the documents, in order, as SentencePiece tokenizes them
    both = np.concatenate([arr for _, arr in shards.iter_unit_streams(ref, "train")] +
                          [arr for _, arr in shards.iter_unit_streams(ref, "validation")])
    assert sorted(decode_docs(sp, both)) == sorted(a + b1 + b2 + c)

    out = tmp_path / "datasets"
    assert do_pack(tiny_sp, [d / "a_saved", d / "b_parquet", d / "c.arrow"], out, *PACK_OPTS) == 0
    assert_same_pack(ref, out)
    mixed = tmp_path / "mixed"
    assert do_pack(tiny_sp, [corpus["ref"][0], d / "b_parquet", corpus["ref"][3]], mixed, *PACK_OPTS) == 0
    assert_same_pack(ref, mixed)

    # each dataset alone equals its JSON lines alone (the saved dataset's files are its split's)
    for given, jsonl in ((d / "a_saved", corpus["ref"][0]), (d / "c.arrow", corpus["ref"][3])):
        one, one_ref = tmp_path / f"one_{given.name}", tmp_path / f"one_ref_{given.name}"
        assert do_pack(tiny_sp, [given], one, *PACK_OPTS) == 0
        assert do_pack(tiny_sp, [jsonl], one_ref, *PACK_OPTS) == 0
        assert_same_pack(one_ref, one)

    # the other split of the DatasetDict, by --split: its documents and nothing else
    test_split = tmp_path / "test_split"
    assert do_pack(tiny_sp, [d / "a_saved"], test_split, "--split", "test", "--validation-ratio", "0",
                   "--workers", "1", block_size=16) == 0
    stream = np.concatenate([arr for _, arr in shards.iter_unit_streams(test_split)])
    assert np.array_equal(stream, expected_stream(sp, corpus["held_out"]))


def test_save_to_disk_dataset_without_splits(tiny_sp, tmp_path):
    """A plain Dataset saved in two Arrow files is read whole, file after file, and equals the JSON lines
    of the same rows cut at the same place."""
    docs = make_docs(200, seed=26)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    files = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(files) == 2
    rows = [datasets.Dataset.from_file(str(f)).num_rows for f in files]
    ref = [write_jsonl(tmp_path / "r0.jsonl", docs[:rows[0]]), write_jsonl(tmp_path / "r1.jsonl", docs[rows[0]:])]
    assert do_pack(tiny_sp, ref, tmp_path / "ref", *PACK_OPTS) == 0
    assert do_pack(tiny_sp, [tmp_path / "saved"], tmp_path / "out", *PACK_OPTS) == 0
    assert_same_pack(tmp_path / "ref", tmp_path / "out")
    # the other readers of corpora (vocab train, vocab report, eval) take the folder too
    assert list(corpus_module.iter_corpus([tmp_path / "saved"])) == docs


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrow-file"])
def test_columnar_units_are_row_ranges_resumable_and_parallel(fmt, tiny_sp, sp, tmp_path, caplog):
    """A columnar file is cut into several units on its row groups / record batches: the units hold the
    documents in order, a pack interrupted after two units resumes with the others and equals a clean
    one, and neither the workers nor the slices (several a unit, or one written by its worker when a
    block is larger than BIG_BLOCK slices) change the shard files."""
    docs = make_docs(600, seed=27)
    src = tmp_path / f"big.{fmt.split('-')[0]}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": docs}), src, row_group_size=50)
    else:
        write_arrow_stream(src, docs, 50, pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream)
    opts = ("--unit-mb", "0.01", "--validation-ratio", "0")
    clean = tmp_path / "clean"
    assert do_pack(tiny_sp, [src], clean, *opts, "--workers", "1") == 0
    entries = [e for e, _ in shards.iter_unit_streams(clean)]
    n_units = len(entries)
    assert n_units >= 3
    assert all(e["range"] == "rows" and e["start"] % 50 == 0 for e in entries)    # cut on blocks
    assert [e["start"] for e in entries[1:]] == [e["end"] for e in entries[:-1]]
    assert (entries[0]["start"], entries[-1]["end"]) == (0, 600)
    stream = np.concatenate([arr for _, arr in shards.iter_unit_streams(clean)])
    assert np.array_equal(stream, expected_stream(sp, docs))

    out = tmp_path / "pack"
    with interrupted_after(2):
        assert do_pack(tiny_sp, [src], out, *opts, "--workers", "1") == 130
    assert not (out / "manifest.json").exists()
    caplog.clear()
    with caplog.at_level("INFO", logger="zhllama.pack"):
        assert do_pack(tiny_sp, [src], out, *opts, "--workers", "1") == 0
    assert f"resumed: 2 of {n_units} unit(s)" in caplog.text
    assert_same_pack(clean, out)

    # the slices: the default (1 MB: one a unit), a block's size (several a unit, in memory), a byte (each
    # unit one slice its worker writes); the planner's choice first, then the packs
    block = max(plan.ColumnarFile(src).block_text_bytes("text"))
    for slice_bytes, whole, many in ((1 << 20, False, False), (block // 2, False, True), (1, True, False)):
        units = plan.plan_columnar(src, 0, 10_000, slice_bytes, "text")
        assert [u.whole for u in units] == [whole] * n_units
        assert any(len(u.slices) > 1 for u in units) == many
        assert all(u.slices[0].start == u.start and u.slices[-1].end == u.end for u in units)
    for slice_mb, workers in ((block / 2e6, "2"), ("0.000001", "2"), ("0.000001", "1")):
        again = tmp_path / f"slices_{slice_mb}_{workers}"
        assert do_pack(tiny_sp, [src], again, *opts, "--slice-mb", slice_mb, "--workers", workers) == 0
        assert_same_pack(clean, again)
        assert sorted(p.name for p in (again / "shards").iterdir()) == \
            sorted(p.name for p in (clean / "shards").iterdir())


# ------------------------------------------------------------------------------------------- bad input

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zhllama data pack: error: "), err
    return err[0]


def test_missing_or_non_string_text_column_is_one_line(tiny_sp, tmp_path, capsys):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": make_docs(30, seed=28), "id": list(range(30))}).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert do_pack(tiny_sp, [saved], out, "--text-field", "content") == 2
    line = one_error_line(capsys)
    assert f"{arrow}: no column 'content' (columns: text, id;" in line
    assert do_pack(tiny_sp, [saved], out, "--text-field", "id") == 2
    assert f"{arrow}: column 'id' holds int64 values, not strings" in one_error_line(capsys)
    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), pqf)
    assert do_pack(tiny_sp, [pqf], out) == 2
    assert f"{pqf}: no column 'text' (columns: body;" in one_error_line(capsys)
    assert not (out / "manifest.json").exists()


def test_null_or_undecodable_row_counted_or_named_and_long_cell_refused(tiny_sp, sp, tmp_path, capsys):
    docs = make_docs(40, seed=29)
    with_null = docs[:7] + [None] + docs[7:]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": with_null}).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    out = tmp_path / "lenient"
    assert do_pack(tiny_sp, [saved], out, "--validation-ratio", "0", "--workers", "1", block_size=16) == 0
    c = shards.read_manifest(out)["counts"]["input"]
    assert (c["documents"], c["missing_field"], c["skipped"]) == (40, 1, 1)
    assert c["first_problems"] == [f"{arrow}:row 7: column 'text' is null (no text)"]
    stream = np.concatenate([arr for _, arr in shards.iter_unit_streams(out)])
    assert np.array_equal(stream, expected_stream(sp, docs))

    capsys.readouterr()
    assert do_pack(tiny_sp, [saved], tmp_path / "strict", "--strict", "--workers", "1") == 2
    assert one_error_line(capsys).endswith(f"error: {arrow}:row 7: column 'text' is null (no text)")
    assert not (tmp_path / "strict" / "manifest.json").exists()

    # a parquet writer need not check UTF-8: bytes that are not are counted, or named with --strict
    bad = tmp_path / "bad.parquet"
    raw = [d.encode("utf-8") for d in docs[:3]] + [b"\xff\xfe oops"] + [d.encode("utf-8") for d in docs[3:]]
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()).view(pa.string())}), bad)
    assert do_pack(tiny_sp, [bad], tmp_path / "bad", "--validation-ratio", "0", "--workers", "1", block_size=16) == 0
    c = shards.read_manifest(tmp_path / "bad")["counts"]["input"]
    assert (c["documents"], c["bad_utf8"]) == (40, 1)
    assert c["first_problems"] == [f"{bad}:row 3: not valid UTF-8 (invalid start byte at byte 0)"]
    stream = np.concatenate([arr for _, arr in shards.iter_unit_streams(tmp_path / "bad")])
    assert np.array_equal(stream, expected_stream(sp, docs))
    capsys.readouterr()
    assert do_pack(tiny_sp, [bad], tmp_path / "bad_strict", "--strict", "--workers", "1") == 2
    assert one_error_line(capsys).endswith(f"error: {bad}:row 3: not valid UTF-8 (invalid start byte at byte 0)")

    long_docs = ["短"] * 5 + ["长" * 100] + ["短"] * 5            # row 5: 300 bytes
    pqf = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": long_docs}), pqf, row_group_size=4)
    assert do_pack(tiny_sp, [pqf], tmp_path / "long", "--max-line-mb", "0.0002", "--workers", "1") == 2
    assert f"{pqf}:row 5: text longer than 0.0002 MB; split it, or raise the limit with --max-line-mb" \
        in one_error_line(capsys)


def test_missing_split_and_nested_saved_dataset_are_one_line(tiny_sp, tmp_path, capsys):
    dd = tmp_path / "data" / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(dd))
    capsys.readouterr()
    assert do_pack(tiny_sp, [dd], tmp_path / "o", "--split", "validation") == 2
    assert f"{dd}: the dataset has no split 'validation' (splits: train;" in one_error_line(capsys)
    assert do_pack(tiny_sp, [tmp_path / "data"], tmp_path / "o") == 2
    assert f"{dd}: is a dataset saved with save_to_disk, inside a folder given as input" in one_error_line(capsys)


def test_hub_names_offline_and_never_local(tiny_sp, tmp_path, capsys, monkeypatch):
    """`hf://` is the only way to name a Hub dataset: offline it is one line (before `datasets` is
    imported), a local path without the prefix is never looked up on the Hub, and a Hub name that a
    local folder shadows is refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert do_pack(tiny_sp, ["hf://someone/zh_corpus/wiki"], tmp_path / "o") == 2
    line = one_error_line(capsys)
    assert line.startswith("zhllama data pack: error: hf://someone/zh_corpus/wiki: a Hub dataset needs the "
                           "network, and HF_HUB_OFFLINE"), line
    assert do_pack(tiny_sp, ["someone/zh_corpus"], tmp_path / "o") == 2
    assert one_error_line(capsys).endswith("error: someone/zh_corpus: no such file or directory")
    (tmp_path / "someone" / "zh_corpus").mkdir(parents=True)
    assert do_pack(tiny_sp, ["hf://someone/zh_corpus"], tmp_path / "o") == 2
    assert "a local 'someone/zh_corpus' exists here" in one_error_line(capsys)
    assert do_pack(tiny_sp, ["hf://a/b/c/d"], tmp_path / "o") == 2
    assert "a Hub dataset is hf://OWNER/NAME" in one_error_line(capsys)


def test_hub_spec_parts():
    h = hfdatasets.parse_hub_spec("hf://Salesforce/wikitext@refs%2Fconvert%2Fparquet/wikitext-2-raw-v1", "test")
    assert (h.repo, h.revision, h.config, h.split) == ("Salesforce/wikitext", "refs/convert/parquet",
                                                      "wikitext-2-raw-v1", "test")
    assert hfdatasets.parse_hub_spec("hf://imdb").repo == "imdb"
    assert h.spec == "hf://Salesforce/wikitext@refs%2Fconvert%2Fparquet/wikitext-2-raw-v1"
    with pytest.raises(InputError, match="read by `data pack` and SFT data only"):
        corpus_module.expand_inputs(["hf://Salesforce/wikitext"])     # e.g. vocab train, eval


def test_hub_stream_shards_pack_like_json_lines(tiny_sp, tmp_path, monkeypatch):
    """The Hub path without the Hub: the commit lookup answers a fixed sha and the stream is datasets'
    own streaming reader over two local parquet files (two shards). The pack has one unit per shard and
    equals the JSON lines of the same text; a second run at the same commit does nothing."""
    d1, d2 = make_docs(80, seed=30), make_docs(60, seed=31)
    files = [tmp_path / "s0.parquet", tmp_path / "s1.parquet"]
    pq.write_table(pa.table({"text": d1}), files[0])
    pq.write_table(pa.table({"text": d2}), files[1])

    class Info:
        sha = "0123456789abcdef0123456789abcdef01234567"

    opened = []

    def local_stream(hub):
        opened.append(hub.revision)
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                     streaming=True)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", lambda self, repo, revision=None: Info())
    monkeypatch.setattr(hfdatasets, "open_stream", local_stream)
    ref = tmp_path / "ref"
    assert do_pack(tiny_sp, [write_jsonl(tmp_path / "j0.jsonl", d1), write_jsonl(tmp_path / "j1.jsonl", d2)],
                   ref, *PACK_OPTS) == 0
    out = tmp_path / "hub"
    assert do_pack(tiny_sp, ["hf://someone/corpus"], out, *PACK_OPTS) == 0
    assert_same_pack(ref, out)
    assert set(opened) == {Info.sha}                  # the workers read the pinned commit
    m = shards.read_manifest(out)
    assert [s["revision"] for s in m["sources"]] == [Info.sha]
    index = json.loads((out / "index.json").read_text())
    assert [(e["start"], e["range"]) for e in index["splits"]["train"]["shards"] if e.get("role") != "tail"] \
        == [(0, "stream shards"), (1, "stream shards")]
    assert run_cli("data", "pack", "--tokenizer", tiny_sp, "--input", "hf://someone/corpus", "--out", out,
                   "--block-size", 64, *PACK_OPTS) == 0
    assert shards.read_manifest(out)["created"] == m["created"]    # up to date: not re-packed


def test_text_pack_imports_no_datasets(tiny_sp, tmp_path):
    """`zhllama --help` and `data pack` on text never import datasets (seconds) nor pyarrow."""
    src = tmp_path / "t.txt"
    src.write_text("".join(d + "\n" for d in make_docs(50, seed=32)), encoding="utf-8")
    code = ("import sys\nfrom zhllama.app.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"assert main(['data', 'pack', '--tokenizer', {str(tiny_sp)!r}, '--input', {str(src)!r}, "
            f"'--out', {str(tmp_path / 'o')!r}, '--block-size', '16', '--workers', '1']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'pyarrow', 'huggingface_hub')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------------ SFT

ALPACA = {"instruction": ["把这句话翻译成英文：你好", "写一首诗", "Summarize"],
          "input": ["", "关于春天", "LLaMA learns Chinese."],
          "output": ["Hello", "春风又绿江南岸", "It does."],
          "system": [None, "你是诗人", None]}
CONVERSATIONS = {"conversations": [
    [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
     {"from": "human", "value": "几点了"}, {"from": "gpt", "value": "不知道"}],
    [{"from": "system", "value": "简短回答"}, {"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]]}


def rows_of(columns):
    """The rows of a column dict as JSON objects, a null being an absent field."""
    n = len(next(iter(columns.values())))
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(n)]


def as_tuples(records):
    return [(r.turns, r.system, r.input) for r in records]


def test_sft_saved_dataset_and_parquet_like_json_lines(tmp_path, tiny_tokenizer_dir):
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                           for r in rows_of(ALPACA) + rows_of(CONVERSATIONS)), encoding="utf-8")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ALPACA)}).save_to_disk(str(tmp_path / "alpaca"))
    datasets.Dataset.from_dict(CONVERSATIONS).to_parquet(str(tmp_path / "conv.parquet"))
    want, _ = load_records([ref])
    assert len(want) == 5
    got, stats = load_records([tmp_path / "alpaca", tmp_path / "conv.parquet"])
    assert as_tuples(got) == as_tuples(want)
    # the training examples (a stage=sft config's `data:`), token for token
    tok = load_tokenizer(tiny_tokenizer_dir)
    examples = [[(e["input_ids"].tolist(), e["labels"].tolist()) for e in
                 SFTDataset([str(p) for p in data], tok, "chinese-alpaca", max_length=128)]
                for data in ([ref], [tmp_path / "alpaca", tmp_path / "conv.parquet"])]
    assert len(examples[0]) == 5 and examples[0] == examples[1]
    assert got[1].source.endswith("data-00000-of-00001.arrow:row 1")
    # weights work as for files; sft.convert writes the same JSON lines from either
    twice, _ = load_records([f"{tmp_path / 'alpaca'}:2"])
    assert as_tuples(twice) == as_tuples(want[:3]) * 2
    convert([ref], tmp_path / "from_json.jsonl")
    convert([tmp_path / "alpaca", tmp_path / "conv.parquet"], tmp_path / "from_datasets.jsonl")
    assert (tmp_path / "from_json.jsonl").read_bytes() == (tmp_path / "from_datasets.jsonl").read_bytes()


def test_sft_dataset_field_map_and_bad_row(tmp_path):
    """field_map maps a dataset's columns as it maps JSON fields; a bad row is named by its row."""
    belle = {"question": ["问题一", "问题二", "问题三"], "std_answer": ["答案一", "", "答案三"]}
    datasets.Dataset.from_dict(belle).save_to_disk(str(tmp_path / "belle"))
    got, stats = load_records([tmp_path / "belle"], field_map="instruction=question,output=std_answer")
    assert [(r.turns[0].user, r.turns[0].assistant) for r in got] == [("问题一", "答案一"), ("问题三", "答案三")]
    assert stats.skipped == {"empty_field": 1}
    arrow = next((tmp_path / "belle").glob("*.arrow"))
    assert stats.first_problems == [f"{arrow}:row 1: field 'std_answer' is empty: nothing to train on"]
    with pytest.raises(InputError) as e:
        load_records([tmp_path / "belle"], field_map="instruction=question,output=std_answer", strict=True)
    assert str(e.value) == f"{arrow}:row 1: field 'std_answer' is empty: nothing to train on"


def test_sft_hub_name_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "x.jsonl"
    capsys.readouterr()
    assert convert_main(["hf://someone/instructions:0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zhllama.sft.convert: error: hf://someone/instructions: a Hub "
                                               "dataset needs the network"), err
    assert not out.exists()


class _RunsCode:
    """Unpickling this creates `marker`: what a reader that deserializes a pickle from a file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_saved_dataset_runs_no_code_and_reads_only_its_own_files(tiny_sp, tmp_path, capsys):
    """issue 24 (no code from data) for save_to_disk folders: the Arrow file's text field is declared as
    pyarrow's pickled extension type, with a live pickle as its metadata (what pyarrow before 14.0.1
    unpickled on reading, CVE-2023-47248): the folder is read as plain text and nothing runs. A state.json
    naming a data file outside the folder is refused, naming it, instead of reading that file."""
    docs = make_docs(20, seed=40)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    (arrow,) = saved.glob("*.arrow")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_RunsCode(marker))
    pickle.loads(payload)                       # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    field = pa.field("text", pa.string(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                   b"ARROW:extension:metadata": payload})
    schema = pa.schema([field])
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array(docs)], schema=schema))
    try:
        read = list(corpus_module.iter_corpus([saved]))
    finally:
        assert not marker.exists(), "the pickle in the dataset's Arrow schema was unpickled"   # checked first
    assert read == docs
    assert do_pack(tiny_sp, [saved], tmp_path / "out", *PACK_OPTS) == 0
    assert not marker.exists()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    arrow.rename(outside / "other.arrow")
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere/other.arrow"}]
    (saved / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert do_pack(tiny_sp, [saved], tmp_path / "out2", *PACK_OPTS) == 2
    line = one_error_line(capsys)
    assert f"{saved}: the saved dataset names a data file outside its folder" in line and "other.arrow" in line


@pytest.mark.parametrize("package, version", [("pyarrow", "14.0.0"), ("datasets", "2.15.0")])
def test_a_reader_that_could_run_code_is_refused_before_reading(package, version, tmp_path, monkeypatch):
    """pyarrow before 14.0.1 unpickles what a file names, datasets before 2.16 runs a Hub dataset's script
    without asking: either is one line naming the package and the version needed, before any file is read."""
    from zhllama import columnar, versions
    from zhllama.versions import VersionError
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: version if p == package else real(p))
    columnar.check_pyarrow.cache_clear()
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["甲"]}).save_to_disk(str(saved))
    try:
        with pytest.raises(VersionError, match=f"{package} {version} is installed; zhllama needs {package}>="):
            list(corpus_module.iter_corpus([saved]))
        if package == "pyarrow":
            with pytest.raises(VersionError, match="CVE-2023-47248"):
                columnar.ColumnarFile(next(saved.glob("*.arrow")))
    finally:
        columnar.check_pyarrow.cache_clear()
