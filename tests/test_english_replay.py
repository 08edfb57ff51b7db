"""The SmolLM2 demo's English replay: where it comes from, how much of it, and that the English the demo
scores (the held-out split of the bundled zhllama/data/en_sample.txt) is never among it.

The replay is ../shared/data/en/wikitext2_en.txt (English Wikipedia) when present, else paragraphs of the
standard library's docstrings; the cla2 recipe has none. Its size is share / (1 - share) of the Chinese
training tokens, taken from the start of the source, skipping the documents the pack's hash split would put
in validation (so the pack's validation split stays Chinese).
"""

from pathlib import Path

import pytest

from zhllama.app.demo import settings as settings_mod
from zhllama.app.demo.settings import DATA, SHARED_EN
from zhllama.app.demo.steps import Demo
from zhllama.modelio import load_tokenizer
from zhllama.pretrain.pack import is_validation_doc

ZH_TRAIN = ["北京是中国的首都，也是一座历史悠久的城市。", "春天来了，花都开了，小鸟在树上唱歌。",
            "保持健康的生活习惯需要规律的作息和均衡的饮食。"] * 40


def test_replay_is_wikitext_when_present_else_standard_library_prose(tmp_path, monkeypatch):
    wiki = tmp_path / "wikitext2_en.txt"
    wiki.write_text("The lobster is a species of the eastern Atlantic.\n", encoding="utf-8")
    monkeypatch.setattr(settings_mod, "SHARED_EN", wiki)
    ours = settings_mod.recipe_settings(True, quick=False)
    assert ours["pack"] == {"block_size": 128, "english_share": 0.1, "english_source": str(wiki)}
    cla2 = settings_mod.recipe_settings(True, quick=False, recipe="cla2")
    assert cla2["pack"] == {"block_size": 128}   # the anchors' recipe: Chinese only
    monkeypatch.setattr(settings_mod, "SHARED_EN", tmp_path / "absent.txt")
    assert settings_mod.recipe_settings(True, quick=True)["pack"]["english_source"] == "stdlib"
    assert "english_share" not in settings_mod.recipe_settings(False, quick=True)["pack"]   # the tiny base


def demo_with(tmp_path, tokenizer_dir, source) -> Demo:
    """A Demo that has run up to the vocabulary merge: the tiny tokenizer, ZH_TRAIN as its training text."""
    demo = Demo(tmp_path / "demo", {"data": {"validation_ratio": 0.1},
                                    "pack": {"english_share": 0.2, "english_source": source}})
    demo.figures["vocab-merge"] = {"tokenizer": str(tokenizer_dir)}
    demo.dir("data").mkdir(parents=True)
    (demo.dir("data") / "zh_train.txt").write_text("".join(x + "\n" for x in ZH_TRAIN), encoding="utf-8")
    return demo


def test_replay_takes_its_share_from_the_start_of_the_source_skipping_validation_docs(tmp_path, tiny_tokenizer_dir):
    docs = [f"Paragraph {i} tells of the harbour, the ships and the weather of the year {1800 + i}."
            for i in range(200)]
    source = tmp_path / "en_source.txt"
    source.write_text("\n".join(docs[:50]) + "\n\n  \n" + "\n".join(docs[50:]) + "\n", encoding="utf-8")
    demo = demo_with(tmp_path, tiny_tokenizer_dir, str(source))
    out, figures = demo.english_mix(tmp_path / "en_mix.txt", 0.2)

    tok = load_tokenizer(tiny_tokenizer_dir)

    def n_tokens(text):
        return len(tok.encode(text, add_special_tokens=False))

    want = 0.2 / 0.8 * sum(n_tokens(x) for x in ZH_TRAIN)   # English / (English + Chinese) = 0.2
    mixed = out.read_text(encoding="utf-8").splitlines()
    training_docs = [x for x in docs if not is_validation_doc(x, 0.1)]   # the pack's own split rule
    assert mixed == training_docs[:len(mixed)]   # from the start of the source, in order, blank lines skipped
    skipped = [x for x in docs[:docs.index(mixed[-1])] if x not in mixed]
    assert skipped and all(is_validation_doc(x, 0.1) for x in skipped)   # the case is really exercised
    have = sum(n_tokens(x) for x in mixed)
    assert have >= want > have - n_tokens(mixed[-1])   # just enough: without the last document it falls short
    assert figures == {"documents": len(mixed), "tokens": have, "share": 0.2, "source": "en_source.txt"}


SOURCES = [pytest.param("stdlib", id="stdlib"),
           pytest.param(str(SHARED_EN), id="wikitext2",
                        marks=pytest.mark.skipif(not SHARED_EN.is_file(),
                                                 reason=f"{SHARED_EN} is absent; the Wikipedia replay is not checked"))]


@pytest.mark.parametrize("source", SOURCES)
def test_the_scored_english_is_never_in_the_replay(tmp_path, tiny_tokenizer_dir, source):
    """Whatever the replay source, no replayed document is one of the bundled English sample's, whose
    held-out split the demo's English column scores."""
    demo = demo_with(tmp_path, tiny_tokenizer_dir, source)
    out, figures = demo.english_mix(tmp_path / "en_mix.txt", 0.2)
    mixed = out.read_text(encoding="utf-8").splitlines()
    assert figures["documents"] == len(mixed) > 0
    bundled = {x.strip() for x in (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines() if x.strip()}
    assert len(bundled) > 50
    assert not bundled & set(mixed)
    # nor any long stretch of it: no replayed document holds a bundled sentence of 60+ characters
    long_ones = [x for x in bundled if len(x) >= 60]
    assert not [x for x in long_ones if any(x in m for m in mixed)]
