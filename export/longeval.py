"""Did a context extension work? Perplexity by position and passkey retrieval (`zhllama eval --positions /
--passkey`).

Perplexity by position bucket. Held-out documents of at least --max-length tokens (BOS + text) are
cut to exactly that many tokens and scored in one forward pass each; the loss of every predicted token
is added to the bucket of its position: 0-1K, 1K-2K, 2K-4K, ... up to --max-length, or the edges given
with --buckets (256,512,1024,2048: 0-256, 256-512, 512-1K, 1K-2K). Every bucket sees the same
documents, so the columns compare positions, not documents. An extension that works keeps 1K-2K close
to 0-1K; a model used past its trained context shows a perplexity that climbs bucket by bucket.

Passkey retrieval (Mohtashami & Jaggi, 2023, as LongLoRA and YaRN report it). A five-digit number is
hidden at a depth (0: the start, 1: the end) of filler sentences repeated to --lengths tokens, and asked
for at the end. A trial counts when the model's greedy prediction of every digit is right (the
argmax at each position of the key, teacher-forced: the same as greedy decoding of those tokens).
Accuracy per length and depth, over --trials keys.
"""

import math
import random
from typing import Dict, List, Sequence

import numpy as np
import torch

from zhllama.errors import UserError
from zhllama.textenc import encode_text

# The passkey prompt (LongLoRA's passkey_retrivial.py, after Mohtashami & Jaggi 2023).
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
LOSS_CHUNK = 1024       # positions whose full-vocabulary logits exist at once


# -------------------------------------------------------------------------------------- positions

def parse_buckets(spec, max_length: int) -> List[int]:
    """Bucket upper edges: `spec` "256,512,1024,2048", or by default 1K, 2K, 4K, ... and --max-length."""
    if spec:
        try:
            edges = [int(x) for x in str(spec).split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--buckets {spec!r}: give increasing token positions, e.g. 256,512,1024,2048") from None
        if not edges or edges != sorted(set(edges)) or edges[0] < 2:
            raise UserError(f"--buckets {spec!r}: give increasing token positions >= 2, e.g. 256,512,1024,2048")
        if edges[-1] > max_length:
            raise UserError(f"--buckets: {edges[-1]} is past --max-length {max_length}")
        return edges
    edges, e = [], 1024
    while e < max_length:
        edges.append(e)
        e *= 2
    return edges + [max_length]


def bucket_label(lo: int, hi: int) -> str:
    def k(n):
        return f"{n // 1024}K" if n % 1024 == 0 and n else (f"{n / 1024:g}K" if n >= 1024 else str(n))
    return f"{k(lo)}-{k(hi)}"


@torch.no_grad()
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (nats) of a batch of sequences: out[:, t] is -log p(ids[t] | ids[:t]), t >= 1 (out[:, 0]
    is 0). The logits are made LOSS_CHUNK positions at a time, so a 64K window does not hold them all."""
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    head = model.get_output_embeddings()
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for a in range(0, ids.shape[1] - 1, LOSS_CHUNK):
        b = min(a + LOSS_CHUNK, ids.shape[1] - 1)
        logits = head(hidden[:, a:b]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, a + 1:b + 1], reduction="none")
        out[:, a + 1:b + 1] = nll.double().cpu()
    return out


def position_perplexity(model, tokenizer, docs: Sequence[str], max_length: int, edges: List[int],
                        batch_size: int = 1) -> dict:
    """Perplexity per position bucket of `model` on the documents of at least `max_length` tokens."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    windows = []
    for doc in docs:
        ids = head + encode_text(tokenizer, doc)
        if len(ids) >= max_length:
            windows.append(ids[:max_length])
    if not windows:
        raise UserError(f"no document has {max_length:,} tokens: --positions scores documents at least --max-length "
                        "long (give longer held-out documents, or a smaller --max-length)")
    device = next(model.parameters()).device
    sums = np.zeros(max_length)
    for k in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[k:k + batch_size], dtype=torch.long, device=device)
        sums += token_losses(model, batch).sum(0).numpy()
    n = len(windows)
    buckets, lo = [], 0
    for hi in edges:
        first = max(lo, 1)                      # position 0 (BOS) is not predicted
        tokens = (hi - first) * n
        loss = float(sums[first:hi].sum()) / tokens
        buckets.append({"from": lo, "to": hi, "label": bucket_label(lo, hi), "tokens": tokens, "loss": loss,
                        "perplexity": math.exp(min(loss, 700.0))})
        lo = hi
    return {"documents": n, "skipped_short": len(docs) - n, "max_length": max_length, "buckets": buckets}


# -------------------------------------------------------------------------------------- passkey

def passkey_text(n_filler: int, depth: float, key: int) -> str:
    """The passkey document: the task, `n_filler` filler sentences with the needle after `depth` of them,
    the question and the key (what a model must continue the question with)."""
    before = round(n_filler * depth)
    return " ".join([PASSKEY_TASK] + [PASSKEY_FILLER] * before + [PASSKEY_NEEDLE.format(key=key)] +
                    [PASSKEY_FILLER] * (n_filler - before) + [f"{PASSKEY_QUESTION} {key}"])


def passkey_document(tokenizer, length: int, depth: float, key: int) -> str:
    """The passkey document with as much filler as fits `length` tokens (BOS included) with this tokenizer."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def size(n_filler):
        return len(bos) + len(encode_text(tokenizer, passkey_text(n_filler, depth, key)))

    shortest = size(0)
    if shortest > length:
        raise UserError(f"--lengths: {length} tokens is shorter than the passkey prompt without filler "
                        f"({shortest} tokens with this tokenizer)")
    per = len(encode_text(tokenizer, " ".join([PASSKEY_FILLER] * 8))) / 8
    n = max(0, int((length - shortest) / per))
    while n > 0 and size(n) > length:
        n -= 1
    return passkey_text(n, depth, key)


def passkey_ids(tokenizer, length: int, depth: float, key: int):
    """(prompt ids, answer ids): the passkey document of at most `length` tokens (BOS included) tokenized
    whole, cut before the key's tokens, which are the answer."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    n_answer = len(encode_text(tokenizer, f"{PASSKEY_QUESTION} {key}")) - len(encode_text(tokenizer, PASSKEY_QUESTION))
    ids = bos + encode_text(tokenizer, passkey_document(tokenizer, length, depth, key))
    return ids[:-n_answer], ids[-n_answer:]


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                     seed: int = 0) -> dict:
    """Share of trials whose every key digit is the model's argmax, per length and depth."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    acc: Dict[str, Dict[str, float]] = {}
    tokens: Dict[str, int] = {}
    for length in lengths:
        row = {}
        for depth in depths:
            right = 0
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                prompt, answer = passkey_ids(tokenizer, length, depth, key)
                ids = torch.tensor([prompt + answer], dtype=torch.long, device=device)
                hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]
                guess = model.get_output_embeddings()(hidden).argmax(-1)[0].tolist()
                right += guess == answer
                tokens[str(length)] = len(prompt) + len(answer)
            row[f"{depth:g}"] = right / trials
        acc[str(length)] = row
    return {"lengths": list(lengths), "depths": [float(d) for d in depths], "trials": trials, "seed": seed,
            "tokens": tokens, "accuracy": acc,
            "by_length": {k: sum(v.values()) / len(v) for k, v in acc.items()}}


def parse_numbers(spec: str, flag: str, kind=int) -> list:
    try:
        values = [kind(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {spec!r}: give comma-separated numbers") from None
    if not values:
        raise UserError(f"{flag}: give at least one value")
    return values


# -------------------------------------------------------------------------------------- tables

def positions_table(results: List[dict]) -> str:
    """Perplexity per bucket, a row per model (and text)."""
    labels = [b["label"] for b in results[0]["positions"]["buckets"]]
    width = max(12, *(len(r["name"]) for r in results)) + 2
    lines = [f"{'perplexity by position':<{width}}" + "".join(f"{x:>12}" for x in labels) + f"{'docs':>7}"]
    for r in results:
        p = r["positions"]
        lines.append(f"{r['name']:<{width}}" + "".join(f"{b['perplexity']:>12,.3f}" for b in p["buckets"]) +
                     f"{p['documents']:>7}")
    return "\n".join(lines)


def passkey_table(result: dict, name: str) -> str:
    p = result["passkey"]
    depths = [f"{d:g}" for d in p["depths"]]
    lines = [f"passkey accuracy, {name} ({p['trials']} keys per cell)",
             f"{'length':>8}{'tokens':>8}" + "".join(f"{'depth ' + d:>11}" for d in depths) + f"{'mean':>8}"]
    for length in p["lengths"]:
        row = p["accuracy"][str(length)]
        lines.append(f"{length:>8}{p['tokens'][str(length)]:>8}" + "".join(f"{row[d]:>11.2f}" for d in depths) +
                     f"{p['by_length'][str(length)]:>8.2f}")
    return "\n".join(lines)
