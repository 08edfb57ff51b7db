"""`zhllama data pack` with a tokenizer.json tokenizer (byte-level BPE: SmolLM2 / LLaMA-3 style):
the same blocks as `tokenizers` itself gives, the tokenizer's own BOS/EOS, special-token text kept
as text, workers not changing the output, and a tokenizer without EOS refused."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from zhllama.app.cli import main
from zhllama.tiny_bpe import make_byte_level_bpe
from pretrain import shards

DATA = Path(__file__).resolve().parent.parent / "zhllama" / "data"


def _docs():
    zh = (DATA / "zh_sample.txt").read_text(encoding="utf-8").splitlines()
    en = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines()
    docs = [d for d in zh + en if d.strip()]
    docs.insert(3, "a document that mentions <|endoftext|> and <|begin_of_text|> as plain text")
    return docs


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"pack_{request.param}")
    en = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines()
    zh = (DATA / "zh_sample.txt").read_text(encoding="utf-8").splitlines()
    return make_byte_level_bpe(d / "tok", en + zh[:50], vocab_size=700, style=request.param)


def _pack(tok, inp, out, *extra):
    return main(["data", "pack", "--tokenizer", str(tok), "--input", str(inp), "--out", str(out),
                 "--block-size", "64", "--validation-ratio", "0", "--unit-mb", "0.05", "--slice-mb", "0.01",
                 *extra])


def test_pack_matches_tokenizers_with_own_bos_eos(tok_dir, tmp_path):
    docs = _docs()
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(docs) + "\n", encoding="utf-8")
    assert _pack(tok_dir, inp, tmp_path / "p1", "--workers", "2") == 0
    assert _pack(tok_dir, inp, tmp_path / "p2", "--workers", "1") == 0
    m = json.loads((tmp_path / "p1" / "manifest.json").read_text())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tk = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    bos, eos = tk.token_to_id(cfg["bos_token"]), tk.token_to_id(cfg["eos_token"])
    assert (m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"]) == (bos, eos)
    assert m["settings"]["tokenizer_kind"] == "tokenizers"
    assert m["tokenizer"]["fingerprint"] == shards.tokenizer_fingerprint(tok_dir)
    tk.encode_special_tokens = True
    want = []
    for d in docs:
        want += [bos] + tk.encode(d, add_special_tokens=False).ids + [eos]
    got = np.concatenate([a for _, a in shards.iter_unit_streams(tmp_path / "p1")]).tolist()
    assert got == want
    blocks = shards.PackedBlocks(tmp_path / "p1", expect_tokenizer=tok_dir, expect_block_size=64)
    assert len(blocks) == len(want) // 64                     # one partial block lost, at the end
    assert blocks[0].tolist() == want[:64]
    a, b = shards.PackedBlocks(tmp_path / "p1"), shards.PackedBlocks(tmp_path / "p2")
    assert len(a) == len(b) and all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    # the literal special-token text in document 3 was packed as text, not as the special id
    specials = {tk.token_to_id(s) for s in ("<|endoftext|>", "<|begin_of_text|>")} - {None}
    third = [bos] + tk.encode(docs[3], add_special_tokens=False).ids + [eos]
    assert not specials & set(third[1:-1])
    # a re-run is up to date
    assert _pack(tok_dir, inp, tmp_path / "p1", "--workers", "2") == 0


def test_tokenizer_without_eos_is_refused(tok_dir, tmp_path, capsys):
    d = tmp_path / "noeos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": None}))
    inp = tmp_path / "in.txt"
    inp.write_text("hello world\n", encoding="utf-8")
    assert _pack(d, inp, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "EOS" in err and str(d) in err


def test_bos_eos_from_the_post_processor_without_config(tok_dir, tmp_path):
    """No tokenizer_config.json: LLaMA-3's template gives BOS; GPT-2 style has no BOS, so none."""
    from zhllama import bpe
    d = tmp_path / "bare"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    bos, eos = bpe.special_ids(d)
    llama3 = tok_dir.parent.name.startswith("pack_llama3")   # the fixture's style (its temp dir's name)
    assert (tk.token_to_id("<|begin_of_text|>") is not None) == llama3
    assert (bos, eos) == ((tk.token_to_id("<|begin_of_text|>"), None) if llama3 else (None, None))


def test_tokenizer_without_bos_packs_ids_and_eos(tok_dir, tmp_path):
    d = tmp_path / "nobos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": cfg["eos_token"]}))
    docs = _docs()[:300]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(docs) + "\n", encoding="utf-8")
    assert _pack(d, inp, tmp_path / "out", "--workers", "1") == 0
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.encode_special_tokens = True
    eos = tk.token_to_id(cfg["eos_token"])
    want = [i for doc in docs for i in tk.encode(doc, add_special_tokens=False).ids + [eos]]
    assert np.concatenate([a for _, a in shards.iter_unit_streams(tmp_path / "out")]).tolist() == want
    ds = shards.PackedBlocks(tmp_path / "out")
    assert ds.bos_id is None and ds.eos_id == eos and len(ds) == len(want) // 64
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["document"] == "ids+eos"
