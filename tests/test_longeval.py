"""`zhllama eval --positions / --passkey` (export/longeval.py): perplexity by position bucket against a plain
per-token reference, the passkey prompt, and the passkey scorer against models whose answers are known."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import cli_error, run_cli
from zhllama.errors import UserError
from zhllama.export import longeval
from zhllama.modelio import load_model, load_tokenizer

SAMPLES_ZH = "zhllama/data/zh_sample.txt"


def test_buckets():
    assert longeval.parse_buckets(None, 8192) == [1024, 2048, 4096, 8192]
    assert longeval.parse_buckets(None, 3000) == [1024, 2048, 3000]
    assert longeval.parse_buckets("256,512,1024,2048", 2048) == [256, 512, 1024, 2048]
    assert [longeval.bucket_label(a, b) for a, b in ((0, 256), (1024, 2048), (2048, 3072))] == \
        ["0-256", "1K-2K", "2K-3K"]
    with pytest.raises(UserError, match="past --max-length 1024"):
        longeval.parse_buckets("512,2048", 1024)
    with pytest.raises(UserError, match="increasing"):
        longeval.parse_buckets("512,256", 1024)


def test_position_perplexity_equals_a_plain_per_token_reference(tiny_model_dir):
    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    docs = [line for line in open(SAMPLES_ZH, encoding="utf-8").read().splitlines() if line.strip()][:12]
    max_length, edges = 40, [10, 20, 40]
    got = longeval.position_perplexity(model, tok, docs, max_length, edges, batch_size=3)
    # reference: every document cut to 40 tokens, log-softmax of the full logits, summed per position range
    windows = [[tok.bos_token_id] + tok.encode(d, add_special_tokens=False) for d in docs]
    windows = [w[:max_length] for w in windows if len(w) >= max_length]
    assert got["documents"] == len(windows) > 0 and got["skipped_short"] == len(docs) - len(windows)
    with torch.no_grad():
        x = torch.tensor(windows)
        logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]          # nll[:, t - 1] predicts position t
    for b, (lo, hi) in zip(got["buckets"], ((1, 10), (10, 20), (20, 40))):
        want = nll[:, lo - 1:hi - 1].mean().item()
        assert b["tokens"] == (hi - lo) * len(windows)
        assert b["loss"] == pytest.approx(want, rel=1e-5) and b["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    with pytest.raises(UserError, match="no document has 5,000 tokens"):
        longeval.position_perplexity(model, tok, docs, 5000, [5000])


def test_passkey_prompt(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = longeval.passkey_ids(tok, 400, depth, 53172)
        assert 300 < len(prompt) + len(answer) <= 400
        assert tok.decode(answer).replace(" ", "") == "53172"
        text = tok.decode(prompt, skip_special_tokens=True)
        assert text.endswith(longeval.PASSKEY_QUESTION) and text.count("53172") == 2
        before = text.split("The pass key is 53172")[0].count(longeval.PASSKEY_FILLER)
        total = text.count(longeval.PASSKEY_FILLER)
        assert before == round(total * depth)
    with pytest.raises(UserError, match="shorter than the passkey prompt without filler"):
        longeval.passkey_ids(tok, 20, 0.5, 53172)


class _Oracle(torch.nn.Module):
    """A 'model' whose prediction at each position is the next input token (right = True), or a token
    it never is (right = False): passkey accuracy must come out 1 and 0."""

    def __init__(self, vocab, right):
        super().__init__()
        self.vocab, self.right = vocab, right
        self.w = torch.nn.Parameter(torch.zeros(1))

    def get_decoder(self):
        def decoder(input_ids):
            nxt = torch.roll(input_ids, -1, dims=1) if self.right else torch.zeros_like(input_ids)
            return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(nxt, self.vocab).float())
        return decoder

    def get_output_embeddings(self):
        return lambda h: h


def test_passkey_accuracy_scores_the_key_digits(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    for right, want in ((True, 1.0), (False, 0.0)):
        r = longeval.passkey_accuracy(_Oracle(len(tok), right), tok, [200, 300], [0, 1], trials=2)
        assert r["by_length"] == {"200": want, "300": want}
        assert r["accuracy"]["300"] == {"0": want, "1": want}
        assert r["tokens"]["200"] <= 200


def test_eval_cli_long_context_tables_and_json(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "long.json"
    assert run_cli("eval", "--model", tiny_model_dir, "--text", SAMPLES_ZH, "--positions", "--max-length", 48,
                   "--buckets", "16,48", "--passkey", "--lengths", "200", "--depths", "0,1", "--trials", 1,
                   "--out", out) == 0
    printed = capsys.readouterr().out
    assert "perplexity by position" in printed and "0-16" in printed and "passkey accuracy" in printed
    results = json.loads(out.read_text())["results"]
    assert [("positions" in r, "passkey" in r) for r in results] == [(True, False), (False, True)]
    assert [b["label"] for b in results[0]["positions"]["buckets"]] == ["0-16", "16-48"]
    assert results[1]["passkey"]["lengths"] == [200] and set(results[1]["passkey"]["accuracy"]["200"]) == {"0", "1"}
    err = cli_error(capsys, "eval", "--model", tiny_model_dir, "--model", tiny_model_dir, "--adapter", tmp_path,
                    "--passkey")
    assert "--adapter applies to one --model" in err
    assert "--positions needs --text" in cli_error(capsys, "eval", "--model", tiny_model_dir, "--positions")
