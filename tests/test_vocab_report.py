"""`zhllama vocab report`: the figures, the table, --json, bad input."""

import json

import pytest

from conftest import synth_chinese, train_sp_pair, write_lines
from zhllama.app.cli import main
from zhllama import spm as zspm
from zhllama.vocab.merge import merge_tokenizers
from zhllama.vocab.report import build_report, format_table, stdlib_english_lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    en = stdlib_english_lines(5000)
    base, add = train_sp_pair(d, en[:4000], 1200, synth_chinese(2000, seed=5), 600)
    merge_tokenizers(base, add, d / "merged")
    merge_tokenizers(base, add, d / "v1", compat="v1")
    text = write_lines(d / "text.txt", synth_chinese(200, seed=6) + en[4000:4400])
    return {"d": d, "base": base, "merged": d / "merged", "v1": d / "v1", "text": text}


def test_report_json_figures(setup, capsys):
    rc = main(["vocab", "report", "--tokenizer", str(setup["base"]), "--tokenizer", str(setup["merged"]),
               "--tokenizer", str(setup["v1"]), "--reference", str(setup["base"]),
               "--text", str(setup["text"]), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["lines"] == 600 and rep["zh_lines"] == 200
    base, merged, v1 = rep["tokenizers"]
    # the reference against itself
    assert base["ref_differ_all"] == 0 and base["parity_differ"] == 0
    # the merge: far fewer tokens per Chinese character, English untouched, all reachable, exact parity
    assert merged["zh_tokens_per_char"] < 0.6 * base["zh_tokens_per_char"]
    assert merged["en_tokens_per_word"] == base["en_tokens_per_word"]
    assert merged["ref_differ_cjk_free"] == 0 and merged["ref_differ_all"] > 0
    assert merged["unreachable"] == 0 and merged["unreachable_scope"] == "added"
    assert merged["unreachable_checked"] == merged["vocab_size"] - base["vocab_size"]
    assert merged["parity_differ"] == 0 and merged["parity_bos_ok"] is True
    assert merged["parity_loader"].startswith("AutoTokenizer")
    assert merged["byte_fallback_share"] < base["byte_fallback_share"]
    # compat v1 appends Latin pieces with score 0: English changes
    assert v1["ref_differ_cjk_free"] > 0 and v1["ref_differ_cjk_free_examples"]
    for r in rep["tokenizers"]:
        assert 0 <= r["byte_fallback_share"] <= 1 and r["tokens"] > 0


def test_report_table(setup, capsys):
    rc = main(["vocab", "report", "-t", str(setup["merged"]), "--reference", str(setup["base"]),
               "--text", str(setup["text"]), "--english-sample", "100"])
    assert rc == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("tokenizer", "vocab", "zh tok/char", "en tok/word", "byte fb", "unreachable",
                "slow/fast differ", "differ vs ref (no CJK)"):
        assert col in header
    assert str(setup["merged"]) in out and "700 lines (200 with CJK, 500 without)" in out


def test_report_without_reference_checks_all_pieces(setup):
    lines = synth_chinese(50, seed=8)
    rep = build_report([setup["base"]], lines, parity=False)
    r = rep["tokenizers"][0]
    assert r["unreachable_scope"] == "all" and "parity_differ" not in r and "ref_differ_all" not in r
    assert r["en_tokens_per_word"] is None and r["zh_tokens_per_char"] > 1
    assert "n/a" in format_table(rep)


def test_report_bad_input(setup, tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_text("nope", encoding="utf-8")
    assert main(["vocab", "report", "-t", str(bad), "--text", str(setup["text"])]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.model" in err
    assert main(["vocab", "report", "-t", str(setup["base"]), "--text", str(tmp_path / "none.txt")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.txt" in err
    assert main(["vocab", "report", "-t", str(setup["base"])]) != 0
    assert "--text" in capsys.readouterr().err


def test_english_sample_is_prose_without_cjk():
    lines = stdlib_english_lines(30000)
    assert len(lines) == 30000
    assert not any(zspm.has_cjk(t) for t in lines)
    assert stdlib_english_lines(10) == lines[:10]


def test_report_on_anchors(tmp_path, capsys):
    """The shared anchors, every figure against plain sentencepiece: LLaMA, the v1 merge (reproduced with
    --compat v1) and Chinese-LLaMA-2. v1 tokenizes CJK-free lines differently and leaves 345 of its 17,953
    added pieces unreachable (docs/benchmarks.md); Chinese-LLaMA-2 changes no CJK-free line."""
    import sentencepiece
    from conftest import shared_path, unreachable_by_sentencepiece
    llama = shared_path("data/llama/tokenizer.model")
    v2 = shared_path("data/anchors/chinese_llama2_tokenizer.model")
    zh = shared_path("data/zh/news_train.txt")
    merge_tokenizers(llama, shared_path("data/anchors/chinese_llama_sp.model"), tmp_path / "v1", compat="v1")
    v1 = tmp_path / "v1" / "tokenizer.model"
    zh_lines = zh.read_text(encoding="utf-8").splitlines()[:500]
    text = write_lines(tmp_path / "zh.txt", zh_lines)
    rc = main(["vocab", "report", "-t", str(llama), "-t", str(v1), "-t", str(v2), "--reference", str(llama),
               "--text", str(text), "--english-sample", "3000", "--json", "--no-parity"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["tokenizer"] for r in rep["tokenizers"]] == [str(llama), str(v1), str(v2)]

    lines = zh_lines + stdlib_english_lines(3000)
    assert all(lines)
    cjk = [zspm.has_cjk(t) for t in lines]
    assert sum(cjk) == 500
    ids = {p: sentencepiece.SentencePieceProcessor(model_file=str(p)).encode(lines) for p in (llama, v1, v2)}
    zh_chars = sum(len(t) for t, c in zip(lines, cjk) if c)
    for r, p in zip(rep["tokenizers"], (llama, v1, v2)):
        zh_tokens = sum(len(e) for e, c in zip(ids[p], cjk) if c)
        assert r["zh_tokens_per_char"] == pytest.approx(zh_tokens / zh_chars, rel=1e-12), p
        differ = sum(a != b for a, b, c in zip(ids[p], ids[llama], cjk) if not c)
        assert r["ref_differ_cjk_free"] == differ, p
    r_llama, r_v1, r_v2 = rep["tokenizers"]
    assert r_v2["ref_differ_cjk_free"] == 0 < r_v1["ref_differ_cjk_free"]
    assert r_v2["zh_tokens_per_char"] < 0.6 * r_llama["zh_tokens_per_char"]
    added = range(32000, 49953)
    assert r_v1["unreachable_scope"] == r_v2["unreachable_scope"] == "added"
    assert (r_v1["unreachable"], r_v1["unreachable_checked"]) == (345, 17953)
    assert len(unreachable_by_sentencepiece(v1.read_bytes(), added)) == 345
