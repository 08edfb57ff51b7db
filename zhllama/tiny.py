"""LLaMA configs: a tiny random LLaMA for tests and the demo, the demo's brief English pretraining of
it, and the real LLaMA-1 shapes.

The tiny model is a normal HF checkpoint (same class, same files as a real LLaMA), so every code path
the tests exercise is the one a 7B run takes; only the sizes differ. The LLaMA-1 shapes (paper,
Table 2) are used by the planner and by tests that build a 7B model on the meta device.
"""

import json
import time
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_write_bytes
from .modelio import load_tokenizer, save_pretrained_atomic
from .schedule import lr_lambda

# name -> (hidden, layers, heads, intermediate); LLaMA-1 paper shapes, vocab 32000, untied embeddings.
LLAMA_SHAPES = {
    "llama-7b": (4096, 32, 32, 11008),
    "llama-13b": (5120, 40, 40, 13824),
    "llama-33b": (6656, 60, 52, 17920),
    "llama-65b": (8192, 80, 64, 22016),
}
LLAMA_VOCAB = 32000


def _llama_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                  max_position_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                  **kwargs):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, hidden_act="silu",
        tie_word_embeddings=kwargs.pop("tie_word_embeddings", False),
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def llama_config(name: str, vocab_size: int = LLAMA_VOCAB, **kwargs):
    """The LlamaConfig of a LLaMA-1 size: 'llama-7b', 'llama-13b', 'llama-33b' or 'llama-65b'."""
    key = name.lower()
    if key not in LLAMA_SHAPES:
        raise UserError(f"unknown model size '{name}'; known: {', '.join(LLAMA_SHAPES)}")
    hidden, layers, heads, inter = LLAMA_SHAPES[key]
    return _llama_config(vocab_size, hidden, layers, heads, inter,
                         kwargs.pop("max_position_embeddings", 2048), **kwargs)


def tiny_llama_config(vocab_size: int, *, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=176, max_position_embeddings=1024, **kwargs):
    """A LlamaConfig small enough for CPU tests (a few MB with a small vocabulary)."""
    return _llama_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                         max_position_embeddings, **kwargs)


def make_tiny_llama(tokenizer_path, out_dir, *, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=176, max_position_embeddings=1024, seed=0,
                    overwrite=False) -> Path:
    """Write a randomly initialised (seeded) tiny LLaMA checkpoint with its tokenizer to `out_dir`.

    The vocabulary size and bos/eos/pad ids come from the tokenizer, so the directory loads with
    `AutoModelForCausalLM` and `AutoTokenizer` alone and passes `load_model(..., tokenizer_path=)`.
    """
    import torch
    from transformers import LlamaForCausalLM


    tok = load_tokenizer(tokenizer_path)
    config = tiny_llama_config(
        len(tok), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(devnull_state)  # do not disturb the caller's RNG stream
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return save_pretrained_atomic(model, tok, out_dir, overwrite=overwrite)


def pretrain_tiny(model, sp_file, text_file, *, steps, batch, block_size, lr, seed, metrics_path,
                  report=None) -> list:
    """Train every weight of a tiny model briefly on a text file: the demo's English base.

    zhllama's engine trains adapters on a real base; the demo's base only has to know some English
    first. Documents are BOS + ids + EOS, concatenated and cut into blocks, visited in a seeded random
    order; AdamW with the schedule of every stage (10% warmup, then cosine to zero: zhllama/schedule.py)
    on the one token loss (zhllama/loss.py), averaged over the batch's predicted tokens. Returns the
    metrics records, also written to `metrics_path` (one JSON object a line); `report(record)`, when
    given, sees each one as it is made.
    """
    # torch (and zhllama.loss, which imports it) only here: `zhllama plan` reads this module's shapes.
    import sentencepiece as spm
    import torch

    from .loss import CausalLMTokenLoss

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    lines = [x for x in Path(text_file).read_text(encoding="utf-8").splitlines() if x.strip()]
    ids = [t for doc in sp.encode(lines) for t in [sp.bos_id(), *doc, sp.eos_id()]]
    n_blocks = len(ids) // block_size
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss_sum = CausalLMTokenLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup_ratio=0.1, min_lr_ratio=0.0))
    model.train()
    records, order = [], torch.randperm(n_blocks, generator=gen)
    with open(metrics_path, "w") as f:
        for step in range(steps):
            start = (step * batch) % n_blocks
            idx = order[start:start + batch]
            if len(idx) < batch:
                order = torch.randperm(n_blocks, generator=gen)
                idx = order[:batch]
            x = blocks[idx]
            t0 = time.perf_counter()
            loss = loss_sum(x, x) / (x.size(0) * (x.size(1) - 1))   # every position after the first is predicted
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            r = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                 "tokens_per_s": x.numel() / dt}
            records.append(r)
            f.write(json.dumps(r) + "\n")
            if report is not None:
                report(r)
    model.eval()
    return records


# A small English + Chinese sample for tiny tokenizers (no ../shared needed: tests and the demo).
TINY_TEXT = """The quick brown fox jumps over the lazy dog. A language model predicts the next token.
We extend the vocabulary of an English model so that Chinese text needs fewer tokens.
Training data is read line by line, tokenized, and packed into fixed-length blocks.
今天天气很好，我们一起去公园散步。中文语言模型需要更大的词表。
北京是中国的首都，上海是一座国际化的大城市。我们学习自然语言处理。
人民日报报道，经济持续稳定发展，科技创新取得新的进展。
"""


def make_tiny_sp(out_file, *, text: str = TINY_TEXT, vocab_size: int = 500, seed_lines: int = 40,
                 model_type: str = "bpe") -> Path:
    """Train a small LLaMA-style SentencePiece model (BPE, byte fallback, no normalisation,
    <unk>/<s>/</s> = 0/1/2).

    The options mirror LLaMA's tokenizer (digits split, byte fallback, dummy prefix) so the code
    paths tests exercise are the ones the real 32k tokenizer takes.
    """
    import io
    import sentencepiece as spm

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in text.splitlines() if ln.strip()] * seed_lines
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    atomic_write_bytes(out_file, buf.getvalue())
    return out_file


def extend_sp_model(base_file, pieces, out_file, score: float = 0.0) -> Path:
    """Append `pieces` (skipping ones already present) to a SentencePiece model, as a merge does.

    Only a test/demo stand-in for `zhllama vocab merge`: the first N pieces stay the base's.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base_file).read_bytes())
    have = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece in have:
            continue
        have.add(piece)
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, score, pb.ModelProto.SentencePiece.NORMAL
    atomic_write_bytes(out_file, proto.SerializeToString())
    return Path(out_file)
