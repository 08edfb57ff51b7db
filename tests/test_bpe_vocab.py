"""Byte-level BPE bases (LLaMA-3, SmolLM2 style `tokenizer.json`): `vocab train --base`, `vocab merge`,
`vocab report`. The merge invariants: base ids and merges unchanged, CJK-free text tokenized exactly
as before, every added token reachable; special tokens keep their ids, new ids come after them."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from test_vocab_merge import tricky
from zhllama import bpe
from zhllama.app.cli import main
from zhllama.spm import has_cjk
from zhllama.tiny_bpe import make_byte_level_bpe
from zhllama.vocab import bpe_merge, bpe_train
from zhllama.vocab.report import stdlib_english_lines

DATA = Path(__file__).resolve().parent.parent / "zhllama" / "data"


def english_lines():
    """English prose the project bundles, stdlib docstrings, and whitespace/digit variants of them."""
    en = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines() + stdlib_english_lines(1500)
    return [t for t in tricky(en) if not has_cjk(t)]


def chinese_lines():
    return [t for t in (DATA / "zh_sample.txt").read_text(encoding="utf-8").splitlines() if t.strip()]


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def merged(request, tmp_path_factory):
    """An English byte-level base of the given style (a few Chinese lines in its training text, so it
    holds some CJK tokens already), Chinese tokens trained for it, and the merge, through the CLI."""
    d = tmp_path_factory.mktemp(f"bpe_{request.param}")
    en = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines()
    base = make_byte_level_bpe(d / "base", en + chinese_lines()[:5], vocab_size=800, style=request.param)
    assert main(["vocab", "train", "--base", str(base), "--input", str(DATA / "zh_sample.txt"),
                 "--vocab-size", "1500", "--out", str(d / "zh")]) == 0
    assert main(["vocab", "merge", "--base", str(base), "--add", str(d / "zh"), "--out", str(d / "merged")]) == 0
    return {"style": request.param, "base": base, "add": d / "zh", "out": d / "merged",
            "report": json.loads((d / "merged" / "merge_report.json").read_text(encoding="utf-8"))}


def test_train_uses_the_base_pre_tokenizer_and_normalizer(merged):
    base = json.loads((merged["base"] / "tokenizer.json").read_text(encoding="utf-8"))
    add = json.loads((merged["add"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert add["pre_tokenizer"] == base["pre_tokenizer"]
    assert add["normalizer"] == base["normalizer"]
    assert len(add["model"]["vocab"]) == 1500
    cfg = json.loads((merged["add"] / "train_config.json").read_text(encoding="utf-8"))
    assert cfg["sampling"]["sentences_seen"] > 100


def test_base_ids_merges_and_special_tokens_unchanged(merged):
    base = bpe.read_tokenizer_json(merged["base"])
    out = bpe.read_tokenizer_json(merged["out"])
    base_ids, out_ids = bpe.all_ids(base), bpe.all_ids(out)
    assert all(out_ids[t] == i for t, i in base_ids.items())
    assert out["model"]["merges"][:len(base["model"]["merges"])] == base["model"]["merges"]
    assert out["added_tokens"] == base["added_tokens"]
    loaded = Tokenizer.from_file(str(merged["out"] / "tokenizer.json"))
    assert all(loaded.token_to_id(t) == i for t, i in base_ids.items())  # as loaded, specials included
    first = max(base_ids.values()) + 1
    new = {t: i for t, i in out_ids.items() if t not in base_ids}
    assert sorted(new.values()) == list(range(first, first + len(new)))  # after every base id, no gap
    assert len(out["model"]["merges"]) - len(base["model"]["merges"]) == len(new)  # one merge each
    r = merged["report"]
    assert r["first_new_id"] == first and r["final_size"] == first + len(new)
    assert r["counts"]["added"] == len(new) > 500
    if merged["style"] == "llama3":
        # the special tokens sit at the end of the base's id range; the new tokens come after them
        assert base_ids["<|begin_of_text|>"] == len(base["model"]["vocab"])
        assert min(new.values()) > base_ids["<|reserved_special_token_7|>"]


def test_only_cjk_tokens_added_and_cjk_free_text_unchanged(merged):
    base = Tokenizer.from_file(str(merged["base"] / "tokenizer.json"))
    out = Tokenizer.from_file(str(merged["out"] / "tokenizer.json"))
    vocab = bpe.all_ids(bpe.read_tokenizer_json(merged["base"]))
    new = [t for t in out.get_vocab(with_added_tokens=False) if t not in vocab]
    assert all(bpe.is_cjk_safe(bpe.token_bytes(t)) for t in new)
    english = english_lines()
    assert len(english) > 3000
    a = base.encode_batch(english)
    b = out.encode_batch(english)
    changed = [t for t, x, y in zip(english, a, b) if x.ids != y.ids]
    assert changed == []
    # the special tokens still parse (and are still added by the post-processor) as before
    s = "<|endoftext|> hi" if merged["style"] == "gpt2" else "<|begin_of_text|>hi<|eot_id|>"
    assert base.encode(s).ids == out.encode(s).ids


def test_every_added_token_reachable(merged):
    """Independent of the merge's own check: whole-text tokens encode alone to themselves, with the
    tokenizer exactly as written; leading-bytes tokens show up for some character they start."""
    out = Tokenizer.from_file(str(merged["out"] / "tokenizer.json"))
    vocab = bpe.all_ids(bpe.read_tokenizer_json(merged["base"]))
    new = {t: i for t, i in out.get_vocab(with_added_tokens=False).items() if t not in vocab}
    unreachable = []
    for t, i in new.items():
        text, tail = bpe.split_utf8(bpe.token_bytes(t))
        if not tail:
            if out.encode(text, add_special_tokens=False).ids != [i]:
                unreachable.append(text)
        elif not any(i in e.ids for e in out.encode_batch([text + c for c in bpe.completions(tail)],
                                                           add_special_tokens=False)):
            unreachable.append(t)
    assert unreachable == []
    assert merged["report"]["unreachable_added"] == 0


def test_chinese_gets_shorter_and_round_trips(merged):
    from transformers import AutoTokenizer

    zh = chinese_lines()
    base = Tokenizer.from_file(str(merged["base"] / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(merged["out"]))
    chars = sum(len(t) for t in zh)
    before = sum(len(e.ids) for e in base.encode_batch(zh, add_special_tokens=False)) / chars
    ids = [hf(t, add_special_tokens=False)["input_ids"] for t in zh]
    after = sum(len(x) for x in ids) / chars
    assert after < 0.5 * before
    assert all(hf.decode(x) == t for x, t in zip(ids, zh))
    assert len(hf) == merged["report"]["final_size"]
    assert hf.bos_token_id == bpe.special_ids(merged["base"])[0]


def test_report_measures_bpe_tokenizers(merged, capsys):
    zh = merged["out"].parent / "zh_heldout.txt"
    zh.write_text("\n".join(chinese_lines()[-40:]) + "\n", encoding="utf-8")
    assert main(["vocab", "report", "-t", str(merged["base"]), "-t", str(merged["out"]),
                 "--reference", str(merged["base"]), "--text", str(zh), "--english-sample", "300", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    b, m = rep["tokenizers"]
    assert m["model_type"] == "byte-level bpe"
    assert m["zh_tokens_per_char"] < 0.5 * b["zh_tokens_per_char"]
    assert m["en_tokens_per_word"] == b["en_tokens_per_word"]
    assert m["ref_differ_cjk_free"] == 0 and m["ref_differ_all"] > 0
    assert m["unreachable"] == 0 and m["unreachable_scope"] == "added"
    assert m["unreachable_checked"] == merged["report"]["final_size"] - merged["report"]["first_new_id"]


def test_max_vocab_caps_the_added_tokens(merged, tmp_path):
    r = bpe_merge.merge_tokenizers(merged["base"], merged["add"], tmp_path / "m", max_vocab=merged["report"]["first_new_id"] + 100)
    assert r["final_size"] <= r["first_new_id"] + 100 + r["counts"]["synthesized_prefixes"]
    assert r["unreachable_added"] == 0


def test_cjk_safety_of_byte_strings():
    assert bpe.is_cjk_safe("中".encode())
    assert bpe.is_cjk_safe(" 中国".encode())
    assert bpe.is_cjk_safe("，".encode())                      # fullwidth comma
    assert bpe.is_cjk_safe("中".encode()[:2])                  # E4 B8: U+4E00..U+4E3F, all CJK
    assert bpe.is_cjk_safe("ａ".encode()[:2])                  # EF BC: U+FF00..U+FF3F, fullwidth
    assert not bpe.is_cjk_safe("中".encode()[1:])              # starts mid-character: any character
    assert not bpe.is_cjk_safe("中".encode()[:1])              # E4: U+4000.., Yijing symbols too
    assert not bpe.is_cjk_safe("“".encode()[:2])               # general punctuation
    assert not bpe.is_cjk_safe(b"hello")
    assert not bpe.is_cjk_safe(b"\xff")
    assert [len(bpe.completions("中".encode()[:2]))] == [64]
    assert bpe.token_bytes(bpe.bytes_token("中 a".encode())) == "中 a".encode()
    assert bpe.bytes_token(b" ") == "\u0120"                  # GPT-2's "Ġ"


def test_bad_bases_are_one_line_errors(merged, tmp_path, capsys):
    from tokenizers import models
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "wp").mkdir()
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    assert main(["vocab", "merge", "--base", str(tmp_path / "wp"), "--add", str(merged["add"]),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "WordPiece" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    assert main(["vocab", "merge", "--base", str(tmp_path / "broken"), "--add", str(merged["add"]),
                 "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["vocab", "train", "--base", str(tmp_path / "wp"), "--input", str(DATA / "zh_sample.txt"),
                 "--out", str(tmp_path / "t")]) == 2


def test_merge_on_shared_chinese_corpus(merged, tmp_path):
    """A larger Chinese sample (../shared/data/zh, skipped when absent): invariants still hold."""
    from conftest import shared_path
    news = shared_path("data/zh/news_train.txt")
    cfg = bpe_train.train([news], tmp_path / "zh", base=merged["base"], vocab_size=3000, max_sentences=5000)
    assert cfg["pieces"] == 3000
    r = bpe_merge.merge_tokenizers(merged["base"], tmp_path / "zh", tmp_path / "m")
    assert r["unreachable_added"] == 0 and r["counts"]["added"] > 1500
    base = Tokenizer.from_file(str(merged["base"] / "tokenizer.json"))
    out = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    english = english_lines()[:2000]
    assert [e.ids for e in base.encode_batch(english)] == [e.ids for e in out.encode_batch(english)]


def test_bpe_base_with_a_sentencepiece_add_is_refused(merged, tmp_path, capsys):
    from zhllama.tiny import make_tiny_sp
    sp = make_tiny_sp(tmp_path / "zh.model")
    assert main(["vocab", "merge", "--base", str(merged["base"]), "--add", str(sp), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vocab train --base" in err and not (tmp_path / "o").exists()
