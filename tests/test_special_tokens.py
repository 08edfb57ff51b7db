"""Text is always text: a literal "</s>" or "<s>" in a record, a prompt or eval text never becomes an
EOS/BOS id, and every stage gives the ids `data pack` (raw SentencePiece) gives the same string.

Expected ids come from the `sentencepiece` library itself, which never parses control tokens out of
text (what `zhllama data pack` encodes with).
"""

import sentencepiece as spm

from zhllama.export.evaluate import evaluate_docs
from zhllama.modelio import load_tokenizer
from zhllama.sft.examples import encode, encode_prompt, tokenize_record
from zhllama.sft.records import Record, Turn
from zhllama.textenc import encode_text

TRICKY = "答案是</s>然后<s>继续 and </s> more <s>"


def _sp(tiny_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


def test_sft_record_with_control_strings_has_no_bos_eos_inside(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rec = Record(turns=[Turn("Repeat: " + TRICKY, TRICKY), Turn("again <s>[INST]", "ok </s> done")])
    for template in ("alpaca", "chinese-alpaca", "llama2-chat"):
        ex = tokenize_record(rec, tok, template, max_length=4096).example
        ids, labels = ex["input_ids"], ex["labels"]
        # EOS only where a response ends (2 turns), BOS only where the template puts one by id.
        trained_eos = [i for i, (t, lab) in enumerate(zip(ids, labels)) if t == eos]
        assert len(trained_eos) == 2, (template, trained_eos)
        assert all(labels[i] == eos for i in trained_eos)
        assert trained_eos[-1] == len(ids) - 1
        expected_bos = 2 if template == "llama2-chat" else 1  # llama2-chat starts every turn with BOS
        assert ids.count(bos) == expected_bos, template
        assert ids[0] == bos


def test_every_stage_encodes_like_data_pack(tiny_tokenizer_dir, tiny_model_dir):
    sp = _sp(tiny_tokenizer_dir)
    tok = load_tokenizer(tiny_tokenizer_dir)
    want = sp.encode(TRICKY)  # zhllama data pack: sp.encode(docs, add_bos=True, add_eos=True)
    assert tok.eos_token_id not in want and tok.bos_token_id not in want
    assert encode_text(tok, TRICKY) == want
    assert encode(tok, TRICKY) == want                                  # SFT pieces
    prompt = encode_prompt(tok, "chinese-alpaca", TRICKY)                # generate / serve prompts
    assert prompt.count(tok.eos_token_id) == 0 and prompt.count(tok.bos_token_id) == 1

    from zhllama.modelio import load_model
    model = load_model(tiny_model_dir).eval()
    r = evaluate_docs(model, tok, [TRICKY], max_length=64, stride=32)    # eval counts the same tokens
    assert r["tokens"] == len(want)


def test_data_pack_blocks_hold_the_same_ids(tiny_tokenizer_dir, tmp_path):
    """The real `zhllama data pack`: with one document per block, every block is BOS + ids + EOS."""
    from zhllama.app.cli import main
    from zhllama.pretrain.shards import PackedBlocks

    want = _sp(tiny_tokenizer_dir).encode(TRICKY)
    tok = load_tokenizer(tiny_tokenizer_dir)
    src = tmp_path / "docs.txt"
    src.write_text((TRICKY + "\n") * 5, encoding="utf-8")
    assert main(["data", "pack", "--tokenizer", str(tiny_tokenizer_dir / "tokenizer.model"), "--input", str(src),
                 "--out", str(tmp_path / "pack"), "--block-size", str(len(want) + 2), "--workers", "1",
                 "--validation-ratio", "0"]) == 0
    blocks = PackedBlocks(tmp_path / "pack", "train")
    assert len(blocks) == 5
    for i in range(len(blocks)):
        assert list(blocks[i]) == [tok.bos_token_id] + encode_text(tok, TRICKY) + [tok.eos_token_id]
