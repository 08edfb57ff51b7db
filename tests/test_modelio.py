"""Model/tokenizer I/O every stage shares (zhllama.modelio) and the tiny-LLaMA factory (zhllama.tiny)."""

import json
import logging
import shutil

import pytest
import torch

from zhllama import modelio, tiny
from zhllama.errors import UserError

TEXT = "The quick brown fox 2024 年，我们一起去公园散步。 émoji ☃"


@pytest.fixture(scope="module")
def sp_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    base = tiny.make_tiny_sp(d / "base.model")
    ext = tiny.extend_sp_model(base, ["天气很好", "公园散步"], d / "ext.model")
    return base, ext


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, sp_files):
    out = tmp_path_factory.mktemp("m") / "tiny"
    return tiny.make_tiny_llama(sp_files[0], out, seed=3)


def _sp_ids(model_file, text):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(model_file)).encode(text)


def test_load_tokenizer_file_dir_and_hf_dir_encode_like_sentencepiece(sp_files, tmp_path):
    base, _ = sp_files
    want = [1] + _sp_ids(base, TEXT)  # BOS, then exactly sentencepiece's ids
    only_sp = tmp_path / "only_sp"
    only_sp.mkdir()
    shutil.copyfile(base, only_sp / "tokenizer.model")
    hf_dir = tmp_path / "hf"
    modelio.save_tokenizer(base, hf_dir)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer.model").is_file()
    for src in (base, only_sp, hf_dir):
        tok = modelio.load_tokenizer(src)
        assert tok.encode(TEXT) == want, src
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert "zhllama_sp_model" not in json.loads((hf_dir / "tokenizer_config.json").read_text())


def test_sp_model_path_and_size(sp_files, tmp_path):
    base, ext = sp_files
    assert modelio.sp_model_path(base) == base
    with pytest.raises(UserError, match="no tokenizer.model"):
        modelio.sp_model_path(tmp_path)
    with pytest.raises(UserError, match="no such"):
        modelio.sp_model_path(tmp_path / "missing")
    assert modelio.tokenizer_size(base) == 500
    assert modelio.tokenizer_size(ext) == 502
    with pytest.raises(UserError, match="not a tokenizer directory"):
        modelio.load_tokenizer(tmp_path)


def test_tiny_llama_loads_from_its_dir_alone_and_is_seeded(tiny_model, sp_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    t = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    assert m.config.vocab_size == len(t) == 500
    assert not m.config.tie_word_embeddings
    assert (m.config.bos_token_id, m.config.eos_token_id) == (t.bos_token_id, t.eos_token_id)
    assert (tiny_model / "generation_config.json").is_file()
    size_mb = sum(p.stat().st_size for p in tiny_model.iterdir()) / 1e6
    assert size_mb < 5, size_mb
    again = tiny.make_tiny_llama(sp_files[0], tmp_path / "again", seed=3)
    other = tiny.make_tiny_llama(sp_files[0], tmp_path / "other", seed=4)
    sd = m.state_dict()
    sd2 = modelio.load_model(again).state_dict()
    sd3 = modelio.load_model(other).state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])


def test_load_model_vocab_mismatch_names_both_and_what_to_run(tiny_model, sp_files):
    _, ext = sp_files
    with pytest.raises(UserError) as e:
        modelio.load_model(tiny_model, tokenizer_path=ext)
    msg = str(e.value)
    assert "502" in msg and "500" in msg and str(ext) in msg and str(tiny_model) in msg
    assert "zhllama vocab resize" in msg
    m = modelio.load_model(tiny_model, tokenizer_path=tiny_model, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert m.config._attn_implementation == "sdpa"


def test_padded_vocab_is_accepted_only_when_marked(tiny_model, sp_files, tmp_path):
    base, _ = sp_files
    cfg = modelio.read_model_config(tiny_model)
    modelio.check_vocab_match(tiny_model, base, cfg)
    padded = dict(cfg, vocab_size=512)
    with pytest.raises(UserError, match="vocabulary mismatch"):
        modelio.check_vocab_match(tiny_model, base, padded)
    modelio.check_vocab_match(tiny_model, base, dict(padded, **{modelio.PADDED_VOCAB_KEY: 500}))


def test_decapoda_tokenizer_and_config_are_repaired(tiny_model, tmp_path, caplog):
    d = tmp_path / "decapoda"
    shutil.copytree(tiny_model, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "", "eos_token": "", "unk_token": "", "model_max_length": 1e30,
         "tokenizer_class": "LLaMATokenizer"}))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(bos_token_id=0, eos_token_id=1, pad_token_id=-1)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}))
    with caplog.at_level(logging.WARNING):
        tok = modelio.load_tokenizer(d)
        model = modelio.load_model(d, tokenizer_path=d)
    assert "LLaMATokenizer" in caplog.text
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.encode("fox")[0] == 1
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)
    assert model.config.pad_token_id is None


def test_save_pretrained_atomic_roundtrip_and_refuses_overwrite(tiny_model, tmp_path):
    model = modelio.load_model(tiny_model)
    out = modelio.save_pretrained_atomic(model, tiny_model, tmp_path / "copy")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json"} <= names
    assert not [n for n in (p.name for p in tmp_path.iterdir()) if n.startswith(".")]  # no temp left
    back = modelio.load_model(out, tokenizer_path=out)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    with pytest.raises(UserError, match="output exists"):
        modelio.save_pretrained_atomic(model, tiny_model, out)
    modelio.save_pretrained_atomic(model, tiny_model, out, overwrite=True)


def test_llama_shapes_on_meta_device():
    from transformers import LlamaForCausalLM
    expected = {"llama-7b": 6.74e9, "llama-13b": 13.02e9, "llama-33b": 32.53e9, "llama-65b": 65.29e9}
    for name, n_params in expected.items():
        cfg = tiny.llama_config(name)
        assert cfg.vocab_size == 32000 and not cfg.tie_word_embeddings
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - n_params) / n_params < 0.002, (name, n)
    with pytest.raises(UserError, match="unknown model size"):
        tiny.llama_config("llama-8b")
