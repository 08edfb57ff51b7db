"""zhllama generate (template prompt ids, streaming, batch/stdin/interactive) and zhllama eval
(perplexity, bits per character, sliding windows, tokens/s) on the tiny model."""

import io
import json
import math
from pathlib import Path

import pytest
import torch

from zhllama.app.cli import main
from zhllama.export.evaluate import evaluate_docs
from zhllama.heldout import windows
from zhllama.modelio import load_model, load_tokenizer
from zhllama.sft.examples import encode_chat_prompt, encode_prompt

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["用一句话介绍北京。", "Name three colours."]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def _hf_greedy(model, tok, ids, n):
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    return text.split("### Instruction:")[0]


# ----------------------------------------------------------------------------------------------- generate

def test_generate_uses_the_template_ids_and_matches_hf_greedy(capsys, tiny_model_dir, model_tok):
    model, tok = model_tok
    assert main(["generate", "--model", tiny_model_dir, "--template", "alpaca", "--prompt", PROMPTS[0],
                 "--greedy", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == _hf_greedy(model, tok, encode_prompt(tok, "alpaca", PROMPTS[0]), 12) + "\n"


def test_generate_raw_continuation_and_json_batch_from_stdin(capsys, monkeypatch, tiny_model_dir, model_tok):
    model, tok = model_tok
    assert main(["generate", "--model", tiny_model_dir, "--no-template", "--prompt", "今天天气", "--greedy",
                 "--max-new-tokens", "8"]) == 0
    want = tok.decode(_raw(model, tok, "今天天气", 8), skip_special_tokens=True)
    assert capsys.readouterr().out == want + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS) + "\n\n"))
    assert main(["generate", "--model", tiny_model_dir, "--json", "--greedy", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == PROMPTS
    for x in lines:
        assert x["response"] == _hf_greedy(model, tok, encode_prompt(tok, "alpaca", x["prompt"]), 6)
        assert x["prompt_tokens"] == len(encode_prompt(tok, "alpaca", x["prompt"])) and x["completion_tokens"] <= 6


def _raw(model, tok, text, n):
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return out[0, len(ids):]


def test_sampling_is_reproducible_with_a_seed(capsys, tiny_model_dir):
    args = ["generate", "--model", tiny_model_dir, "--prompt", PROMPTS[1], "--max-new-tokens", "10",
            "--temperature", "1.0", "--top-p", "0.95", "--json"]
    outs = []
    for seed in (1, 1, 2):
        assert main(args + ["--seed", str(seed)]) == 0
        outs.append(json.loads(capsys.readouterr().out)["response"])
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]          # 10 tokens sampled from a ~3000-token near-uniform distribution


def test_interactive_keeps_a_multi_turn_history(capsys, tiny_model_dir):
    from zhllama.export.generate import Generator, run_interactive
    from zhllama.export.inference import load_inference_model

    engine = load_inference_model(tiny_model_dir, template="alpaca", max_new_tokens=4)
    gen = Generator(engine, sampling={"max_tokens": 4, "temperature": 0.0, "top_p": 1.0})
    seen = []
    real = gen.prompt_ids
    gen.prompt_ids = lambda messages: seen.append([dict(m) for m in messages]) or real(messages)
    lines = iter(["你好", "", "再说一遍", "/reset", "Hello", "/exit", "never read"])
    run_interactive(gen, read=lambda _: next(lines))
    assert [len(m) for m in seen] == [1, 3, 1]
    assert seen[1][0]["content"] == "你好" and seen[1][1]["role"] == "assistant" and seen[1][2]["content"] == "再说一遍"
    tok = engine.tokenizer
    assert real(seen[1]) == encode_chat_prompt(tok, "alpaca", seen[1])
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_generate_errors(tmp_path, capsys, tiny_model_dir):
    assert main(["generate", "--model", tmp_path / "nope", "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "x", "--temperature", "0"]) == 2
    assert "--greedy" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- eval

def test_windows_score_every_token_once_with_context():
    for n in range(0, 40):
        ids = list(range(n))
        for max_length, stride in ((8, 1), (8, 3), (8, 7), (64, 32)):
            wins = windows(ids, max_length, stride)
            scored = [w.start + j for w in wins for j in range(w.first, len(w.ids))]
            assert scored == list(range(1, n)), (n, max_length, stride)
            for w in wins:
                assert len(w.ids) <= max_length and w.ids == ids[w.start:w.start + len(w.ids)]
                # every scored token after the first window sees at least max_length - stride tokens of context
                if w.start > 0:
                    assert w.first >= max_length - stride


def _docs(n_zh=6, n_en=4):
    zh = (REPO / "zhllama" / "data" / "zh_sample.txt").read_text(encoding="utf-8").splitlines()[:n_zh]
    en = [p for p in (REPO / "zhllama" / "data" / "en_sample.txt").read_text(encoding="utf-8").splitlines()
          if p.strip()][:n_en]
    en = [p[:300] for p in en]
    return zh + en


def _direct_nll(model, tok, docs):
    """(total NLL in nats, scored tokens) by one plain forward per document: BOS + tokens, every token after BOS."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(d, add_special_tokens=False)])
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return nll, n


def test_perplexity_and_bits_per_char_equal_a_direct_forward(model_tok):
    model, tok = model_tok
    docs = _docs()
    r = evaluate_docs(model, tok, docs, max_length=1024, stride=512, batch_size=3)
    nll, n = _direct_nll(model, tok, docs)
    assert r["scored_tokens"] == n == r["tokens"]
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(nll / math.log(2) / sum(len(d) for d in docs), rel=1e-5)
    assert r["characters"] == sum(len(d) for d in docs) and r["tokens_per_s"] > 0

    # Sliding windows on long documents still score every token once, with bounded context.
    short = evaluate_docs(model, tok, docs, max_length=16, stride=8, batch_size=4)
    assert short["scored_tokens"] == n and short["windows"] > len(docs)
    assert short["nll"] != pytest.approx(nll, rel=1e-9)   # less context: a different (valid) figure


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A tiny model with a different (smaller) tokenizer: bits/char must still be comparable."""
    from zhllama.modelio import save_tokenizer
    from zhllama.tiny import make_tiny_llama, make_tiny_sp

    root = tmp_path_factory.mktemp("other")
    make_tiny_sp(root / "tok" / "tokenizer.model", vocab_size=400)
    save_tokenizer(load_tokenizer(root / "tok" / "tokenizer.model"), root / "tok")
    return make_tiny_llama(root / "tok" / "tokenizer.model", root / "model", seed=1)


def test_eval_cli_json_compares_models_with_different_tokenizers(tmp_path, capsys, tiny_model_dir, other_model):
    docs = _docs(4, 2)
    text = tmp_path / "held.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    # --max-length 1024 holds every document in one window: the figures must equal a plain forward
    assert main(["eval", "--model", tiny_model_dir, "--model", other_model, "--text", text, "--json",
                 "--max-length", "1024"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["model"] for r in res] == [str(tiny_model_dir), str(other_model)]
    chars = sum(len(d) for d in docs)
    want = [_direct_nll(load_model(d).eval(), load_tokenizer(d), docs) for d in (tiny_model_dir, other_model)]
    assert want[0][1] != want[1][1]                          # different tokenizers ...
    for r, (nll, n) in zip(res, want):                       # ... one denominator for bits per character
        assert (r["characters"], r["scored_tokens"]) == (chars, n)
        assert r["nll"] == pytest.approx(nll, rel=1e-5)
        assert r["bits_per_char"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert main(["eval", "--model", tiny_model_dir, "--text", text, "--limit", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "bits/char" in table[0] and len(table) == 2


def test_eval_errors(tmp_path, capsys, tiny_model_dir):
    assert main(["eval", "--model", tiny_model_dir, "--text", tmp_path / "missing.txt"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["eval", "--model", tiny_model_dir, "--text", empty]) == 2
    err = capsys.readouterr().err
    assert "empty.txt" in err and ("no documents" in err or "no text" in err)
    ok = tmp_path / "ok.txt"
    ok.write_text("你好\n")
    assert main(["eval", "--model", tiny_model_dir, "--text", ok, "--max-length", "8", "--stride", "8"]) == 2
    assert "--stride" in capsys.readouterr().err


@pytest.mark.parametrize("command, words", [("generate", ["--template", "--no-template", "interactive", "--greedy"]),
                                            ("eval", ["bits per char", "--stride", "--max-length"])])
def test_help(capsys, command, words):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words), out
