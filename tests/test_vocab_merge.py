"""`zhllama vocab merge`: the merge invariants, the HF tokenizer dir, compat v1, bad input."""

import json
import random
import shutil

import pytest

from conftest import cli_error, shared_path, synth_chinese, train_sp_pair, unreachable_by_sentencepiece, write_lines
from zhllama.app.cli import main
from zhllama import spm as zspm
from zhllama.vocab import train as vtrain
from zhllama.hf_tokenizer import load_hf_tokenizer, parity
from zhllama.vocab.merge import merge_protos, merge_tokenizers
from zhllama.vocab.report import stdlib_english_lines


def tricky(lines, seed=0):
    """Each line, plus variants with leading spaces, runs of spaces, tabs, newlines and digits."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        out.append(line)
        words = line.split(" ")
        k = rng.randrange(6)
        if k == 0:
            out.append(" " * rng.randint(1, 9) + line)
        elif k == 1:
            out.append((" " * rng.randint(2, 12)).join(words) + " " * rng.randint(0, 3))
        elif k == 2:
            out.append(line[: len(line) // 2] + "\n" + " " * rng.randint(0, 4) + line[len(line) // 2:])
        elif k == 3:
            out.append(f"{rng.randint(0, 10**9)} {line} {rng.random():.5f}")
        elif k == 4:
            out.append("\t" + line.replace("，", " ， ").replace("。", "  。\n\n"))
        else:
            out.append("中文 English  混合  " + line + "   ")
    out += ["", " ", "  ", "\n", " \n ", "1234567890", "  中国  人民  ", "Hello  世界", "ｆｕｌｌ　ｗｉｄｔｈ　１２３"]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small English BPE 'base' (LLaMA settings) and a small Chinese model, trained on text made here."""
    d = tmp_path_factory.mktemp("tiny")
    en = stdlib_english_lines(6000)
    base, add = train_sp_pair(d, en[:4000], 1500, synth_chinese(3000, seed=3), 700)
    return {"dir": d, "base": base, "add": add, "en_heldout": en[4000:], "zh": synth_chinese(300, seed=99)}


def _check_invariants(base_path, out, english, mixed):
    base = zspm.load_proto(base_path)
    merged = zspm.load_proto(out / "tokenizer.model")
    n = len(base.pieces)
    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    # ids 0..n-1 kept, with their scores and types
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:n]] == [(p.piece, p.score, p.type) for p in base.pieces]
    assert report["final_size"] == len(merged.pieces) == n + report["counts"]["added"]
    added = list(range(n, len(merged.pieces)))
    assert added, "nothing was added"
    # only CJK pieces were added, none twice, with distinct scores below every base score
    assert all(zspm.has_cjk(merged.pieces[i].piece) for i in added)
    assert len({merged.pieces[i].piece for i in added}) == len(added)
    scores = [merged.pieces[i].score for i in added]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert max(scores) < min(p.score for p in base.pieces if p.type == zspm.NORMAL)
    # 1. CJK-free text tokenizes exactly as with the base
    assert english and not any(zspm.has_cjk(t) for t in english)
    sp_base, sp_merged = zspm.processor(base), zspm.processor(merged)
    differ = [t for t, a, b in zip(english, sp_base.encode(english), sp_merged.encode(english)) if a != b]
    assert differ == []
    # 2. every added piece is reachable (checked by a plain reference, not the merge's own check)
    assert unreachable_by_sentencepiece((out / "tokenizer.model").read_bytes(), added) == []
    assert report["unreachable_added"] == 0
    # 3. the HF tokenizer written to the dir encodes exactly like sentencepiece, with and without BOS
    tok = load_hf_tokenizer(out)
    r = parity(merged, tok, mixed)
    assert r["differ"] == 0, r["examples"]
    assert r["bos_ok"] is True
    sp_ids = sp_merged.encode(mixed)
    assert [tok(t)["input_ids"] for t in mixed[:200]] == [[1] + x for x in sp_ids[:200]]
    # and decodes like it
    assert [tok.decode(x, skip_special_tokens=True) for x in sp_ids[:200]] == [sp_merged.decode(x) for x in sp_ids[:200]]
    return report


def test_merge_invariants_on_models_trained_here(tiny, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["vocab", "merge", "--base", str(tiny["base"]), "--add", str(tiny["add"]), "--out", str(out)])
    assert rc == 0
    assert "merged 1,500 +" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["merge_report.json", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    mixed = tricky(tiny["zh"] + tiny["en_heldout"][:300])
    report = _check_invariants(tiny["base"], out, tiny["en_heldout"], mixed)
    c = report["counts"]
    assert c["add_pieces"] == 700 and c["skipped_special"] == 259
    assert c["candidates"] == c["added"] + c["dropped_unreachable"] + c["dropped_unknown_char"]
    assert c["skipped_duplicate"] + c["filtered_no_cjk"] + c["candidates"] + c["skipped_special"] == 700
    assert report["mode"] == "v2" and report["base_ids_kept"] == 1500
    assert set(report["files"]) == {"special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["bos_token"] == "<s>"


def test_programmatic_api_and_atomic_output(tiny, tmp_path):
    out = tmp_path / "m"
    r1 = merge_tokenizers(tiny["base"], tiny["add"], out)
    assert isinstance(r1, dict) and r1["final_size"] > 1500
    before = (out / "tokenizer.model").read_bytes()
    from zhllama.errors import UserError
    with pytest.raises(UserError, match="--overwrite"):
        merge_tokenizers(tiny["base"], tiny["add"], out)
    r2 = merge_tokenizers(tiny["base"], tiny["add"], out, overwrite=True)
    assert (out / "tokenizer.model").read_bytes() == before and r2["final_size"] == r1["final_size"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_max_vocab_keeps_characters_and_caps_the_rest(tiny):
    full, r_full = merge_protos(zspm.load_proto(tiny["base"]), zspm.load_proto(tiny["add"]))
    singles_full = {p.piece for p in full.pieces[1500:] if len(p.piece) == 1}
    cap = 1500 + len(singles_full) + 20
    assert cap < len(full.pieces)
    capped, r = merge_protos(zspm.load_proto(tiny["base"]), zspm.load_proto(tiny["add"]), max_vocab=cap)
    assert len(capped.pieces) <= cap and r["counts"]["capped"] > 0
    assert singles_full <= {p.piece for p in capped.pieces[1500:]}
    assert zspm.unreachable_pieces(capped, range(1500, len(capped.pieces))) == []


def test_unreachable_pieces_are_dropped_to_a_fixed_point():
    # The base has "乙丙" (a strong merge); the added model builds "甲乙丙丁" from "甲乙" + "丙丁",
    # which the base's "乙丙" blocks (甲 | 乙丙 | 丁 has no further merge): it must be dropped.
    import sentencepiece as spm
    pb = zspm.model_pb2()

    def model(pieces):
        m = pb.ModelProto()
        m.trainer_spec.model_type = zspm.BPE
        m.trainer_spec.byte_fallback = False
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = True
        m.normalizer_spec.remove_extra_whitespaces = False
        for piece, score, typ in [("<unk>", 0, zspm.UNKNOWN), ("<s>", 0, zspm.CONTROL), ("</s>", 0, zspm.CONTROL)] + pieces:
            p = m.pieces.add()
            p.piece, p.score, p.type = piece, score, typ
        return m

    base = model([("▁", -1, 1), ("乙丙", -2, 1), ("甲", -3, 1), ("乙", -4, 1), ("丙", -5, 1), ("丁", -6, 1), ("a", -7, 1)])
    add = model([("甲乙", -1, 1), ("丙丁", -2, 1), ("甲乙丙丁", -3, 1), ("a甲", -4, 1), ("ab", -5, 1),
                 ("甲", -6, 1), ("乙", -7, 1), ("丙", -8, 1), ("丁", -9, 1)])
    spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    merged, r = merge_protos(base, add)
    pieces = [p.piece for p in merged.pieces[len(base.pieces):]]
    assert "甲乙丙丁" not in pieces and "甲乙丙丁" in r["dropped_unreachable_examples"]
    assert "ab" not in pieces and r["counts"]["filtered_no_cjk"] == 1
    assert "a甲" in pieces  # has a CJK character and is reachable: kept
    n = len(base.pieces)
    assert unreachable_by_sentencepiece(merged.SerializeToString(), range(n, len(merged.pieces))) == []
    # kept on request, the plain reference finds exactly the blocked piece, as the report does
    kept, r = merge_protos(base, add, drop_unreachable=False)
    blocked = [i for i in range(n, len(kept.pieces)) if kept.pieces[i].piece == "甲乙丙丁"]
    assert unreachable_by_sentencepiece(kept.SerializeToString(), range(n, len(kept.pieces))) == blocked != []
    assert r["unreachable_added"] == 1


def test_base_from_hf_dir_including_old_llamatokenizer_config(tiny, tmp_path):
    d = tmp_path / "old-ckpt"
    d.mkdir()
    shutil.copy(tiny["base"], d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "LLaMATokenizer"}', encoding="utf-8")
    (d / "config.json").write_text('{"architectures": ["LLaMAForCausalLM"]}', encoding="utf-8")
    merge_tokenizers(d, tiny["add"], tmp_path / "a")
    merge_tokenizers(tiny["base"], tiny["add"], tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


# --- bad input ---------------------------------------------------------------------------------------

def _fail(capsys, *args):
    return cli_error(capsys, "vocab", "merge", *args)


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a model\n", bytes(range(256)) * 4,
                                     b"\x0a\x03abc"])
def test_base_that_is_not_a_sentencepiece_model(tiny, tmp_path, capsys, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    err = _fail(capsys, "--base", bad, "--add", tiny["add"], "--out", tmp_path / "o")
    assert str(bad) in err and "SentencePiece model" in err
    assert not (tmp_path / "o").exists()


def test_added_model_that_is_not_a_sentencepiece_model(tiny, tmp_path, capsys):
    bad = tmp_path / "zh.model"
    bad.write_text("not a model", encoding="utf-8")
    err = _fail(capsys, "--base", tiny["base"], "--add", bad, "--out", tmp_path / "o")
    assert str(bad) in err


def test_base_dir_without_tokenizer_model(tiny, tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}", encoding="utf-8")
    err = _fail(capsys, "--base", d, "--add", tiny["add"], "--out", tmp_path / "o")
    assert str(d) in err and "tokenizer.model" in err
    err = _fail(capsys, "--base", tmp_path / "missing", "--add", tiny["add"], "--out", tmp_path / "o")
    assert "missing" in err and "no such file" in err


# --- the real LLaMA tokenizer (needs ../shared) ------------------------------------------------------

@pytest.fixture(scope="module")
def llama_merge(tmp_path_factory):
    llama = shared_path("data/llama/tokenizer.model")
    news = shared_path("data/zh/news_train.txt")
    reviews = shared_path("data/zh/reviews_train.txt")
    d = tmp_path_factory.mktemp("llama")
    lines = news.read_text(encoding="utf-8").splitlines()[:6000] + reviews.read_text(encoding="utf-8").splitlines()[:6000]
    vtrain.train([write_lines(d / "zh.txt", lines)], d / "zh", vocab_size=6000, threads=2)
    merge_tokenizers(llama, d / "zh" / "zh_sp.model", d / "merged")
    heldout = news.read_text(encoding="utf-8").splitlines()[-600:] + reviews.read_text(encoding="utf-8").splitlines()[-600:]
    return {"llama": llama, "out": d / "merged", "heldout": heldout, "dir": d}


def test_llama_merge_invariants(llama_merge):
    english = stdlib_english_lines(30000)
    assert len(english) > 20000
    mixed = tricky(llama_merge["heldout"] + english[:1500], seed=1)
    report = _check_invariants(llama_merge["llama"], llama_merge["out"], english, mixed)
    assert report["counts"]["added"] > 3000
    # fewer tokens per Chinese character than LLaMA
    sp_l = zspm.processor(llama_merge["llama"])
    sp_m = zspm.processor(llama_merge["out"] / "tokenizer.model")
    zh = llama_merge["heldout"]
    assert sum(map(len, sp_m.encode(zh))) < 0.6 * sum(map(len, sp_l.encode(zh)))


def test_merge_of_chinese_llamas_pieces_drops_the_unreachable_ones(tmp_path):
    """LLaMA + Chinese-LLaMA's 20,000-piece model: 335 of its CJK candidates cannot be reached once merged,
    and the merge drops them (the case where the reachability invariant has something to catch)."""
    llama = shared_path("data/llama/tokenizer.model")
    merge_tokenizers(llama, shared_path("data/anchors/chinese_llama_sp.model"), tmp_path / "m")
    news = shared_path("data/zh/news_train.txt").read_text(encoding="utf-8").splitlines()[-300:]
    english = stdlib_english_lines(3000)
    report = _check_invariants(llama, tmp_path / "m", english, tricky(news + english[:300], seed=2))
    assert (report["counts"]["dropped_unreachable"], report["counts"]["added"]) == (335, 16917)


def test_llama_tokenizer_class_loads_and_agrees_without_leading_space(llama_merge):
    """transformers 5's LlamaTokenizer rebuilds its pre-tokenizer (Metaspace, prepend_scheme=first):
    it loads the dir and agrees with sentencepiece except on text starting with a space."""
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast
    out = llama_merge["out"]
    assert type(AutoTokenizer.from_pretrained(str(out))).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    merged = zspm.load_proto(out / "tokenizer.model")
    lines = [t for t in tricky(llama_merge["heldout"][:300], seed=2) if not t.startswith(" ")]
    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        tok = cls.from_pretrained(str(out))
        assert len(tok) == len(merged.pieces)
        assert parity(merged, tok, lines)["differ"] == 0
    r = parity(merged, LlamaTokenizer.from_pretrained(str(out)), ["  两个空格开头", " one space"])
    assert r["differ"] == 2  # documented: use AutoTokenizer / load_hf_tokenizer


def test_transformers_conversion_of_llama_disagrees_and_ours_does_not(llama_merge, tmp_path):
    """Why tokenizer.json is written by zhllama: transformers ranks merges by id ("▁▁", id 259, has
    sentencepiece score -1e9 and merges last) and skips the dummy prefix before a leading space."""
    from transformers import AutoTokenizer
    from zhllama.hf_tokenizer import save_hf_tokenizer
    (tmp_path / "conv").mkdir()
    shutil.copy(llama_merge["llama"], tmp_path / "conv" / "tokenizer.model")
    (tmp_path / "conv" / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    converted = AutoTokenizer.from_pretrained(str(tmp_path / "conv"))
    save_hf_tokenizer(llama_merge["llama"], tmp_path / "ours")
    ours = load_hf_tokenizer(tmp_path / "ours")
    spaces = ["def f(x):  return x   +  1", "a" + " " * 30 + "b", "x  =  1", "    indented line"]
    inner = ["def f(x):  return x   +  1", "a" + " " * 30 + "b", "x  =  1"]
    assert parity(llama_merge["llama"], converted, inner)["differ"] == 3
    assert parity(llama_merge["llama"], converted, ["    indented line"])["differ"] == 1
    assert parity(llama_merge["llama"], ours, spaces)["differ"] == 0
    p = zspm.load_proto(llama_merge["llama"])
    assert p.pieces[259].piece == "▁▁" and p.pieces[259].score == -1e9


def test_compat_v1_reproduces_chinese_llama_alpaca(tmp_path, capsys):
    llama = shared_path("data/llama/tokenizer.model")
    zh = shared_path("data/anchors/chinese_llama_sp.model")
    out = tmp_path / "v1"
    assert main(["vocab", "merge", "--base", str(llama), "--add", str(zh), "--out", str(out), "--compat", "v1"]) == 0
    m = zspm.load_proto(out / "tokenizer.model")
    base, add = zspm.load_proto(llama), zspm.load_proto(zh)
    assert len(m.pieces) == 49953
    # their merge_tokenizers.py, step by step
    have = {p.piece for p in base.pieces}
    expect = [p.piece for p in add.pieces if p.piece not in have]
    assert [p.piece for p in m.pieces[32000:]] == expect
    assert all(p.score == 0 for p in m.pieces[32000:])
    assert [p.piece for p in m.pieces[:32000]] == [p.piece for p in base.pieces]
    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "v1" and report["final_size"] == 49953
    # what v1 breaks, recorded: ~1.9% of the added pieces are unreachable ...
    assert report["unreachable_added"] == 345    # 1.92% (docs/benchmarks.md; a property of the two anchors)
    # ... and CJK-free English tokenizes differently (digits, Latin pieces, score 0)
    english = stdlib_english_lines(5000)
    a, b = zspm.processor(base).encode(english), zspm.processor(m).encode(english)
    assert sum(x != y for x, y in zip(a, b)) / len(english) > 0.05
