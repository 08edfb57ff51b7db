"""`vocab resize` on LLaMA-3-shaped models with byte-level BPE tokenizers: grouped-query attention,
rope_theta 500,000, `<|begin_of_text|>`-style specials at the end of the id range, and tied
embeddings (LLaMA-3.2 1B/3B, SmolLM2). A tied model stays tied: one matrix, no lm_head tensor, its
new rows subword-means of the base BPE split; old rows bit-identical, so old logits are unchanged."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from zhllama import bpe
from zhllama.tiny_bpe import make_byte_level_bpe, make_tiny_llama3
from zhllama.vocab import bpe_merge, bpe_train, resize

DATA = Path(__file__).resolve().parent.parent / "zhllama" / "data"


def _state(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("resize_tied")
    en = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines()
    base = make_byte_level_bpe(d / "base", en, vocab_size=600, style="llama3")
    bpe_train.train([DATA / "zh_sample.txt"], d / "zh", base=base, vocab_size=700)
    bpe_merge.merge_tokenizers(base, d / "zh", d / "merged")
    tied = make_tiny_llama3(base, d / "tied", tie_word_embeddings=True, seed=1)
    out = d / "tied_resized"
    report = resize.resize_checkpoint(tied, d / "merged", out)
    return {"d": d, "base": base, "merged": d / "merged", "tied": tied, "out": out, "report": report}


def test_llama3_shapes(env):
    cfg = json.loads((env["tied"] / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    assert theta == 500000.0
    tok = Tokenizer.from_file(str(env["base"] / "tokenizer.json"))
    assert tok.token_to_id("<|begin_of_text|>") == tok.get_vocab_size(with_added_tokens=False)
    assert cfg["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")


def test_tied_stays_tied_without_lm_head(env):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((env["out"] / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    n_new = len(Tokenizer.from_file(str(env["merged"] / "tokenizer.json")).get_vocab())
    assert cfg["vocab_size"] == n_new > json.loads((env["tied"] / "config.json").read_text())["vocab_size"]
    state = _state(env["out"])
    assert resize.LM_HEAD not in state and state[resize.EMBED].shape[0] == n_new
    model = AutoModelForCausalLM.from_pretrained(str(env["out"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert env["report"]["tied_embeddings"] is True
    # the tokenizer written beside it is the merged one, specials at their ids
    a = Tokenizer.from_file(str(env["merged"] / "tokenizer.json"))
    b = Tokenizer.from_file(str(env["out"] / "tokenizer.json"))
    assert b.get_vocab() == a.get_vocab()
    assert b.token_to_id("<|begin_of_text|>") == cfg["bos_token_id"] == a.token_to_id("<|begin_of_text|>")
    assert env["report"]["lm_head_init"] == env["report"]["init"] == "subword-mean"


def test_old_rows_and_old_logits_unchanged(env):
    from transformers import AutoModelForCausalLM

    old, new = _state(env["tied"]), _state(env["out"])
    n_old = old[resize.EMBED].shape[0]
    assert torch.equal(new[resize.EMBED][:n_old], old[resize.EMBED])
    for k, v in old.items():
        if k not in (resize.EMBED, resize.LM_HEAD):
            assert torch.equal(new[k], v), k
    tok = Tokenizer.from_file(str(env["base"] / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The rain stopped before noon and we walked home.").ids])
    a = AutoModelForCausalLM.from_pretrained(str(env["tied"])).eval()
    b = AutoModelForCausalLM.from_pretrained(str(env["out"])).eval()
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits[..., :n_old]
    assert torch.allclose(la, lb, atol=1e-6, rtol=0)


def test_new_rows_are_subword_means_of_the_base_bpe_split(env):
    """Re-derived independently: a whole-text token's pieces are what the base tokenizer makes of
    its text (one pre-token); a leading-bytes token's are its bytes merged by the base model."""
    old = _state(env["tied"])[resize.EMBED].float()
    new = _state(env["out"])[resize.EMBED]
    base = Tokenizer.from_file(str(env["base"] / "tokenizer.json"))
    merged = Tokenizer.from_file(str(env["merged"] / "tokenizer.json"))
    n_old = old.shape[0]
    checked = 0
    for tok, i in merged.get_vocab(with_added_tokens=False).items():
        if i < n_old:
            continue
        text, tail = bpe.split_utf8(bpe.token_bytes(tok))
        if tail:
            pieces = [t.id for t in base.model.tokenize(tok)]
        else:
            pieces = base.encode(text, add_special_tokens=False).ids
        assert len(pieces) >= 2
        assert torch.allclose(new[i].float(), old[pieces].mean(0), atol=1e-6), tok
        checked += 1
    assert checked == env["report"]["new_vocab"] - env["report"]["old_vocab"] == env["report"]["rows_from_base_pieces"]


def test_tied_checkpoint_that_stores_lm_head_anyway(env, tmp_path):
    """Some tied checkpoints carry an lm_head copy; the resized one holds the one matrix only."""
    src = tmp_path / "with_head"
    src.mkdir()
    for f in env["tied"].iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    state = _state(env["tied"])
    state[resize.LM_HEAD] = state[resize.EMBED].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    resize.resize_checkpoint(src, env["merged"], tmp_path / "out", init="random")
    out = _state(tmp_path / "out")
    assert resize.LM_HEAD not in out


def test_untied_llama3_keeps_zero_output_rows(env, tmp_path):
    untied = make_tiny_llama3(env["base"], tmp_path / "untied", tie_word_embeddings=False, seed=2)
    r = resize.resize_checkpoint(untied, env["merged"], tmp_path / "out")
    st = _state(tmp_path / "out")
    n_old = r["old_vocab"]
    assert r["lm_head_init"] == "zero" and not r["tied_embeddings"]
    assert torch.count_nonzero(st[resize.LM_HEAD][n_old:]) == 0
    assert torch.count_nonzero(st[resize.EMBED][n_old:]) > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
