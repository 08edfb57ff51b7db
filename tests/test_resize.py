"""`zhllama vocab resize`: old rows bit-identical, subword-mean init, shard-by-shard streaming,
round trip, and refusals. Tiny SentencePiece models and a tiny LLaMA are built here; the
LLaMA/Chinese-LLaMA-2 test runs only where ../shared is present."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, shared_path
from zhllama import modelio, tiny
from zhllama.errors import UserError
from zhllama.vocab import resize

# New pieces: word-start vs mid-word versions of the same text, and characters the base only knows
# as bytes ('☃' and '雪' are not in the tiny training text, so the base splits them into <0x..>).
NEW_PIECES = ["▁天气很好", "公园散步", "▁公园散步", "☃雪", "学习自然"]
BASE_SIZE = 500


def _sp_verbatim(sp_file):
    """The base model encoding a string as written: an independent re-derivation for the checks."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(open(sp_file, "rb").read())
    m.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def _state(d):
    files = sorted(Path(d).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("resize")
    base = tiny.make_tiny_sp(d / "base.model")
    ext = tiny.extend_sp_model(base, NEW_PIECES, d / "ext.model")
    model = tiny.make_tiny_llama(base, d / "model", seed=1)
    out = d / "resized"
    # lm_head_init subword-mean: both matrices get subword-mean rows, as item 2 of the issue states
    report = resize.resize_checkpoint(model, ext, out, lm_head_init="subword-mean")
    return {"dir": d, "base": base, "ext": ext, "model": model, "out": out, "report": report}


def test_old_rows_bit_identical_and_old_vocab_logits_unchanged(env):
    old, new = _state(env["model"]), _state(env["out"])
    n_new = BASE_SIZE + len(NEW_PIECES)
    assert set(old) == set(new)
    for k in old:
        if k in (resize.EMBED, resize.LM_HEAD):
            assert new[k].shape == (n_new, old[k].shape[1]) and new[k].dtype == old[k].dtype
            assert torch.equal(new[k][:BASE_SIZE], old[k]), k
        else:
            assert torch.equal(new[k], old[k]), k
    m0 = modelio.load_model(env["model"])
    m1 = modelio.load_model(env["out"], tokenizer_path=env["out"])
    ids = torch.randint(0, BASE_SIZE, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o0 = m0(ids, output_hidden_states=True)
        o1 = m1(ids, output_hidden_states=True)
    assert torch.equal(o0.hidden_states[-1], o1.hidden_states[-1])
    assert o1.logits.shape[-1] == n_new
    torch.testing.assert_close(o1.logits[..., :BASE_SIZE], o0.logits, rtol=0, atol=1e-6)


def test_subword_mean_rows_are_means_of_base_pieces(env):
    old, new = _state(env["model"]), _state(env["out"])
    sp = _sp_verbatim(env["base"])
    pieces = {p: sp.encode(p.replace("▁", " "), out_type=str) for p in NEW_PIECES}
    # The splits are the base's split of the piece itself: word-start pieces keep their "▁",
    # mid-word ones have none, and unknown characters fall back to bytes (which count).
    for p, split in pieces.items():
        assert "".join(split).replace("▁", "") == p.replace("▁", "") or "<0x" in "".join(split)
    assert not any("▁" in s for s in pieces["公园散步"])
    assert pieces["▁公园散步"] != pieces["公园散步"]
    assert {"<0xE2>", "<0x98>", "<0x83>"} <= set(pieces["☃雪"])
    for key in (resize.EMBED, resize.LM_HEAD):
        for i, p in enumerate(NEW_PIECES):
            ids = sp.encode(p.replace("▁", " "))
            assert 1 not in ids  # no BOS
            want = old[key][ids].float().mean(0)
            torch.testing.assert_close(new[key][BASE_SIZE + i], want, rtol=0, atol=1e-7)
        # word-start and mid-word versions get different rows
        assert not torch.equal(new[key][BASE_SIZE + 1], new[key][BASE_SIZE + 2])
    assert env["report"]["rows_from_base_pieces"] == len(NEW_PIECES)


def test_default_init_is_subword_mean_input_rows_and_zero_output_rows(env, tmp_path):
    out = tmp_path / "default"
    report = resize.resize_checkpoint(env["model"], env["ext"], out)
    assert (report["init"], report["lm_head_init"]) == ("subword-mean", "zero")
    default, both = _state(out), _state(env["out"])
    assert torch.equal(default[resize.EMBED], both[resize.EMBED])
    assert torch.equal(default[resize.LM_HEAD][:BASE_SIZE], both[resize.LM_HEAD][:BASE_SIZE])
    assert not default[resize.LM_HEAD][BASE_SIZE:].any()
    assert both[resize.LM_HEAD][BASE_SIZE:].abs().sum() > 0


def test_mean_and_random_init():
    old = torch.randn(10, 8, dtype=torch.bfloat16)
    m = resize.build_matrix(old, 10, 16, [None] * 4, "mean")
    assert torch.equal(m[:10], old) and m.dtype == torch.bfloat16
    assert torch.equal(m[10:], m[10].expand(6, -1))  # one mean row, padding included
    torch.testing.assert_close(m[10].float(), old.float().mean(0), rtol=0.01, atol=1e-3)
    r1 = resize.build_matrix(old, 10, 14, [None] * 4, "random", seed=5, std=0.02)
    r2 = resize.build_matrix(old, 10, 14, [None] * 4, "random", seed=5, std=0.02)
    r3 = resize.build_matrix(old, 10, 14, [None] * 4, "random", seed=6, std=0.02)
    assert torch.equal(r1, r2) and not torch.equal(r1[10:], r3[10:])
    big = resize.build_matrix(old, 10, 4010, [None] * 4000, "random", std=0.02)
    assert abs(big[10:].float().std().item() - 0.02) < 0.002


def test_roundtrip_and_loads_from_dir_alone(env, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import sentencepiece as spm
    out = env["out"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == BASE_SIZE + len(NEW_PIECES) and modelio.PADDED_VOCAB_KEY not in cfg
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.model").is_file()
    m = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == m.config.vocab_size
    text = "今天天气很好，我们一起去公园散步。"
    sp = spm.SentencePieceProcessor(model_file=str(env["ext"]))
    assert tok.encode(text) == [1] + sp.encode(text)
    again = modelio.save_pretrained_atomic(m, out, tmp_path / "again")
    m2 = modelio.load_model(again, tokenizer_path=again)
    ids = torch.tensor([[1] + sp.encode(text)])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    assert any(i >= BASE_SIZE for i in ids[0].tolist())  # the new pieces are actually used


def test_refuses_smaller_and_non_extending_tokenizers(env, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    smaller = tiny.make_tiny_sp(tmp_path / "small.model", vocab_size=420)
    with pytest.raises(UserError, match="fewer than the model's 500"):
        resize.resize_checkpoint(env["model"], smaller, tmp_path / "o1")
    m = pb.ModelProto()
    m.ParseFromString(env["ext"].read_bytes())
    m.pieces[300].piece, m.pieces[301].piece = m.pieces[301].piece, m.pieces[300].piece
    swapped = tmp_path / "swapped.model"
    swapped.write_bytes(m.SerializeToString())
    with pytest.raises(UserError, match="does not extend.*id 300"):
        resize.resize_checkpoint(env["model"], swapped, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(UserError, match="output exists"):
        resize.resize_checkpoint(env["model"], env["ext"], env["out"])


def test_pad_to_multiple_of_marks_padding(env, tmp_path):
    out = tmp_path / "padded"
    resize.resize_checkpoint(env["model"], env["ext"], out, pad_to_multiple_of=64, init="mean")
    cfg = json.loads((out / "config.json").read_text())
    n = BASE_SIZE + len(NEW_PIECES)
    assert cfg["vocab_size"] == 512 and cfg[modelio.PADDED_VOCAB_KEY] == n
    m = modelio.load_model(out, tokenizer_path=out)  # padded rows accepted, tokenizer stays n
    assert m.get_input_embeddings().weight.shape[0] == 512
    assert modelio.tokenizer_size(out) == n
    # resizing a padded model again: its real vocabulary is n, the padding rows are dropped
    ext2 = tiny.extend_sp_model(env["ext"], ["北京上海"], tmp_path / "ext2.model")
    out2 = tmp_path / "padded2"
    resize.resize_checkpoint(out, ext2, out2)
    a, b = _state(out), _state(out2)
    assert b[resize.EMBED].shape[0] == n + 1
    assert torch.equal(b[resize.EMBED][:n], a[resize.EMBED][:n])


def test_sharded_input_streams_to_sharded_output(env, tmp_path):
    model = modelio.load_model(env["model"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="200KB")
    modelio.save_tokenizer(env["model"], sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    rep = resize.resize_checkpoint(sharded, env["ext"], out, max_shard_size="150KB", lm_head_init="subword-mean")
    assert rep["shards_in"] > 1 and len(rep["shards_out"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(rep["shards_out"])
    a, b = _state(env["out"]), _state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # same as unsharded
    assert modelio.load_model(out, tokenizer_path=out).config.vocab_size == BASE_SIZE + len(NEW_PIECES)


def test_tied_embeddings(env, tmp_path):
    from transformers import LlamaForCausalLM
    cfg = tiny.tiny_llama_config(BASE_SIZE, tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = modelio.save_pretrained_atomic(LlamaForCausalLM(cfg), env["base"], tmp_path / "tied")
    out = tmp_path / "tied_out"
    resize.resize_checkpoint(tied, env["ext"], out)
    m0, m1 = modelio.load_model(tied), modelio.load_model(out, tokenizer_path=out)
    assert m1.config.tie_word_embeddings
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 7, 99, 250]])
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits[..., :BASE_SIZE], m0(ids).logits, rtol=0, atol=1e-6)


def test_cli(env, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert run_cli("vocab", "resize", "--model", env["model"], "--tokenizer", env["ext"],
                   "--out", out, "--init", "random", "--seed", "3") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["init"] == "random" and json.loads((out / "resize_report.json").read_text()) == report
    with pytest.raises(SystemExit) as e:  # an argparse error: usage and one line naming the option
        run_cli("vocab", "resize", "--model", env["model"], "--tokenizer", env["base"],
                "--out", tmp_path / "x", "--pad-to-multiple-of", "0")
    assert e.value.code == 2 and "--pad-to-multiple-of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_cli("vocab", "resize", "--help")
    assert e.value.code == 0 and "subword-mean" in capsys.readouterr().out


@pytest.mark.slow
def test_llama_to_chinese_llama2_tokenizer(tmp_path):
    import sentencepiece as spm
    base = shared_path("data/llama/tokenizer.model")
    zh = shared_path("data/anchors/chinese_llama2_tokenizer.model")
    b, z = spm.SentencePieceProcessor(model_file=str(base)), spm.SentencePieceProcessor(model_file=str(zh))
    assert all(b.id_to_piece(i) == z.id_to_piece(i) for i in range(32000))  # it extends LLaMA's
    model = tiny.make_tiny_llama(base, tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2,
                                 intermediate_size=32)
    out = tmp_path / "zh"
    rep = resize.resize_checkpoint(model, zh, out, pad_to_multiple_of=64, lm_head_init="subword-mean")
    assert rep["new_vocab"] == 55296 and rep["rows"] == 55296  # already a multiple of 64
    old, new = _state(model), _state(out)
    sp = _sp_verbatim(base)
    for key in (resize.EMBED, resize.LM_HEAD):
        assert torch.equal(new[key][:32000], old[key])
        for piece in ("中国", "▁中国", "我们", "人民日报"):
            i = z.piece_to_id(piece)
            if i == z.unk_id() or i < 32000:
                continue
            want = old[key][sp.encode(piece.replace("▁", " "))].float().mean(0)
            torch.testing.assert_close(new[key][i], want, rtol=0, atol=1e-7)
    text = "人民日报报道，中国经济持续发展。"
    tok = modelio.load_tokenizer(out)
    assert tok.encode(text) == [1] + z.encode(text)
