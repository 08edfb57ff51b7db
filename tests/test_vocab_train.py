"""`zhllama vocab train`: inputs of every kind, LLaMA settings, sampling, jieba, bad input."""

import gzip
import json
import random

import pytest

from conftest import cli_error, synth_chinese, write_lines
from zhllama.app.cli import main
from zhllama import spm as zspm
from zhllama.vocab import train as vtrain

@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zh")
    lines = synth_chinese(3000)
    write_lines(d / "a.txt", lines[:1000])
    sub = d / "sub"
    sub.mkdir()
    with gzip.open(sub / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for line in lines[1000:2000]:
            f.write(json.dumps({"text": line, "id": 1}, ensure_ascii=False) + "\n")
    with gzip.open(sub / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[2000:]) + "\n")
    return d


def test_train_all_input_kinds_and_llama_settings(corpus_dir, tmp_path, capsys):
    out = tmp_path / "sp"
    rc = main(["vocab", "train", "--input", str(corpus_dir / "a.txt"), str(corpus_dir / "sub"),
               str(corpus_dir / "*.txt"), "--vocab-size", "600", "--out", str(out), "--threads", "2"])
    assert rc == 0
    assert "trained 600 pieces" in capsys.readouterr().out
    for name in ("zh_sp.model", "zh_sp.vocab", "train_config.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    # a.txt named twice (file + glob) is read once; the directory brings the two .gz files.
    assert [f["documents"] for f in cfg["files"]] == [1000, 1000, 1000]
    assert cfg["sampling"]["sentences_seen"] == 3000 and not cfg["sampling"]["sampled"]
    m = zspm.load_proto(out / "zh_sp.model")
    ts, ns = m.trainer_spec, m.normalizer_spec
    assert len(m.pieces) == 600 and ts.vocab_size == 600
    assert ts.model_type == zspm.BPE and ts.byte_fallback and ts.split_digits
    assert ts.character_coverage == pytest.approx(0.9995)
    assert ts.allow_whitespace_only_pieces and ts.num_threads == 2
    assert ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    assert [m.pieces[i].piece for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sum(p.type == zspm.BYTE for p in m.pieces) == 256
    # digits are split, so no piece holds two digits
    assert not any(sum(c.isdigit() for c in p.piece) > 1 for p in m.pieces if p.type == zspm.NORMAL)
    vocab_lines = (out / "zh_sp.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 600 and vocab_lines[0].startswith("<unk>\t")


def test_sampling_is_bounded_and_deterministic(corpus_dir, tmp_path):
    cfgs, models = [], []
    for k in range(2):
        out = tmp_path / f"s{k}"
        cfgs.append(vtrain.train([corpus_dir], out, vocab_size=500, max_sentences=800, seed=7, threads=1))
        models.append((out / "zh_sp.model").read_bytes())
    s = cfgs[0]["sampling"]
    assert s["sentences_seen"] == 3000 and s["sentences_sampled"] == 800 and s["sampled"]
    assert models[0] == models[1]  # same inputs + seed -> same sample -> same model


def test_reservoir_is_uniform_enough():
    counts = [0] * 10
    for seed in range(300):
        r = vtrain.Reservoir(5, seed)
        for i in range(10):
            r.add(i)
        for i in r.items:
            counts[i] += 1
    # each item kept with probability 1/2: 150 expected of 300
    assert all(100 < c < 200 for c in counts), counts


def test_long_lines_are_cut_at_sentence_ends():
    text = "第一句话很长。" * 50 + "\n\n短句\n"
    parts = list(vtrain.split_sentences(text, 60))
    assert parts[-1] == "短句"
    assert all(len(p.encode("utf-8")) <= 60 for p in parts)
    assert "".join(parts[:-1]) == "第一句话很长。" * 50
    assert all(p.endswith("。") for p in parts[:-1])


def test_jieba_pieces_respect_word_boundaries(tmp_path):
    # "我们喜欢" always appears as one unit: plain BPE learns it as one piece; with jieba
    # ("我们" | "喜欢") no piece may span the boundary.
    rng = random.Random(1)
    lines = ["".join(rng.choice(["我们喜欢", "北京", "天气", "很好", "公园"]) for _ in range(8)) + "。"
             for _ in range(400)]
    f = tmp_path / "t.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vtrain.train([f], tmp_path / "plain", vocab_size=280, threads=1)
    seg = vtrain.train([f], tmp_path / "seg", vocab_size=280, threads=1, use_jieba=True)
    assert seg["jieba"] and seg["settings"]["pretokenization_delimiter"] == vtrain.DELIMITER
    p_plain = {p.piece.lstrip("▁") for p in zspm.load_proto(tmp_path / "plain" / "zh_sp.model").pieces}
    p_seg = {p.piece.lstrip("▁") for p in zspm.load_proto(tmp_path / "seg" / "zh_sp.model").pieces}
    assert "我们喜欢" in p_plain
    assert "我们" in p_seg and "喜欢" in p_seg
    assert not any("们喜" in p for p in p_seg)
    assert not any(vtrain.DELIMITER in p for p in p_seg)


def test_jieba_delimiter_only_between_chinese_words():
    import jieba
    s = vtrain.jieba_delimit("我们喜欢 iPhone 15 手机", jieba.cut)
    assert s.replace(vtrain.DELIMITER, "") == "我们喜欢 iPhone 15 手机"
    assert f"我们{vtrain.DELIMITER}喜欢" in s
    assert "iPhone 15" in s


# --- bad input: one line naming the file, non-zero exit -------------------------------------------

def _fail(capsys, *args):
    return cli_error(capsys, "vocab", "train", *args)


def test_missing_input(tmp_path, capsys):
    err = _fail(capsys, "--input", tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert "nope.txt" in err and "no such file" in err
    assert not (tmp_path / "o").exists()


def test_empty_input(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o")
    assert "empty.txt" in err and "empty" in err


def test_binary_input(tmp_path, capsys):
    f = tmp_path / "weights.txt"
    f.write_bytes(b"\x89PNG\x00\x00\x01binary" * 10)
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o")
    assert "weights.txt" in err and "binary" in err


def test_non_utf8_input(tmp_path, capsys):
    f = tmp_path / "gbk.txt"
    f.write_bytes(("\n".join(synth_chinese(50))).encode("gbk"))
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o")
    assert "gbk.txt:1" in err and "UTF-8" in err
    # --skip-bad-lines: bad lines are skipped, and a file with nothing left is still an error
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o", "--skip-bad-lines")
    assert "gbk.txt" in err


def test_jsonl_without_text_field(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"content": "你好"}\n', encoding="utf-8")
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o")
    assert "d.jsonl:1" in err and "text" in err


def test_vocab_size_larger_than_corpus_supports(tmp_path, capsys):
    f = tmp_path / "small.txt"
    f.write_text("\n".join(synth_chinese(30)) + "\n", encoding="utf-8")
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o", "--vocab-size", "20000")
    assert "small.txt" in err and "--vocab-size 20000" in err and "at most" in err
    err = _fail(capsys, "--input", f, "--out", tmp_path / "o", "--vocab-size", "100")
    assert "small.txt" in err and "smaller than" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(corpus_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    err = _fail(capsys, "--input", corpus_dir / "a.txt", "--out", out, "--vocab-size", "400")
    assert "--overwrite" in err
    assert main(["vocab", "train", "--input", str(corpus_dir / "a.txt"), "--out", str(out),
                 "--vocab-size", "500", "--overwrite"]) == 0
    assert not (out / "keep").exists() and (out / "zh_sp.model").exists()


def test_train_on_shared_slice(zh_news, tmp_path):
    """The real corpus: a slice trains in seconds and gives Chinese multi-character pieces."""
    lines = zh_news.read_text(encoding="utf-8").splitlines()[:5000]
    f = tmp_path / "news.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = vtrain.train([f], tmp_path / "o", vocab_size=5000, threads=2)
    m = zspm.load_proto(tmp_path / "o" / "zh_sp.model")
    assert cfg["pieces"] == 5000
    multi = [p.piece for p in m.pieces if p.type == zspm.NORMAL and zspm.count_cjk(p.piece) >= 2]
    assert len(multi) > 1000
