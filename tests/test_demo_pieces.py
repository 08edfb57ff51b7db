"""The pieces the demo now takes from the core and the stages instead of its own copies: the tiny
base's pretraining (the shared schedule and token loss), held-out scoring by `zhllama eval`'s evaluator
in the demo's windows, and the free port of its launcher runs."""

import json
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from zhllama.app.demo import heldout_figures
from zhllama.export.evaluate import evaluate_docs
from zhllama.hosts import free_port
from zhllama.modelio import load_model, load_tokenizer
from zhllama.tiny import pretrain_tiny

from conftest import SAMPLES


def test_pretrain_tiny_follows_the_shared_schedule_and_learns(tmp_path, tiny_tokenizer_dir, tiny_model_dir):
    model = load_model(tiny_model_dir)
    records = pretrain_tiny(model, tiny_tokenizer_dir / "tokenizer.model", SAMPLES / "en_sample.txt", steps=10,
                            batch=4, block_size=32, lr=3e-3, seed=0, metrics_path=tmp_path / "metrics.jsonl")
    # The lr after step s is the one step s + 1 uses. 10 steps, 10% warmup = 1 step at the peak, then cosine
    # to 0 over the other 9: after step k + 1 it is 3e-3 x (1 + cos(pi k / 9)) / 2, written out here.
    lrs = [r["lr"] for r in records]
    assert lrs == pytest.approx([3e-3 * (1 + math.cos(math.pi * k / 9)) / 2 for k in range(10)], rel=1e-12)
    assert (lrs[0], lrs[3], lrs[6], lrs[-1]) == pytest.approx((3e-3, 2.25e-3, 7.5e-4, 0.0), abs=1e-15)  # cos 0, pi/3, 2pi/3, pi
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, records
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records
    # step 1's loss is the untrained model's mean next-token loss: about ln(vocab) nats
    assert abs(records[0]["loss"] - math.log(model.config.vocab_size)) < 1.0


def test_heldout_figures_are_the_demo_windows_of_512_scored_by_the_evaluator(tiny_model_dir):
    """BOS + tokens in non-overlapping windows (each seeing the token before it) is what evaluate_docs
    scores with max_length = window + 1 and stride = window; checked by hand with a window of 8."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir).eval()
    docs = ["北京是中国的首都，上海是一座国际化的大城市。", "The quick brown fox jumps over the lazy dog again."]

    def by_hand(window):
        nats, tokens = 0.0, 0
        with torch.no_grad():
            for doc in docs:
                ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
                for s in range(0, len(ids) - 1, window):
                    chunk = torch.tensor([ids[s:s + window + 1]])
                    logits = model(input_ids=chunk[:, :-1]).logits
                    nats += float(F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
                    tokens += chunk.shape[1] - 1
        return nats, tokens

    nats, tokens = by_hand(8)
    r = evaluate_docs(model, tok, docs, max_length=8 + 1, stride=8, batch_size=3)
    assert r["scored_tokens"] == tokens > 2 * 8 and r["windows"] > len(docs)
    assert math.isclose(r["nll"], nats, rel_tol=1e-5)
    nats, tokens = by_hand(512)   # the demo's window
    fig = heldout_figures(tiny_model_dir, tiny_model_dir, [], docs, en_docs=docs[1:])
    assert fig["chars"] == sum(map(len, docs)) and fig["tokens"] == tokens
    assert math.isclose(fig["loss"], nats / tokens, rel_tol=1e-5)
    assert math.isclose(fig["bits_per_char"], nats / math.log(2) / fig["chars"], rel_tol=1e-5)
    assert fig["en_bits_per_char"] > 0


def test_free_port_can_be_bound():
    port = free_port()
    assert 1024 <= port <= 65535      # a real port, not 0 ("any"), which would bind whatever free_port returned
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)
