"""Learn Chinese byte-level BPE tokens for a `tokenizer.json` base (LLaMA-3.x, SmolLM2, Mistral-NeMo).

    zhllama vocab train --base smollm2/ --input data/zh --vocab-size 20000 --out zh_bpe

The counterpart of the SentencePiece training in `vocab/train.py` (same corpus reading and seeded
reservoir sampling). The new model is trained with `tokenizers`' BpeTrainer under the base's own
normalizer and pre-tokenizer, over the full 256-byte alphabet, so every token it learns is one the
base's pre-tokenizer can let through (a token never spans two pre-tokens), and `vocab merge` can
append it with its merge. Writes DIR/tokenizer.json and DIR/train_config.json, atomically.
"""

import json
import time
from importlib.metadata import version
from pathlib import Path

from zhllama import bpe
from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, sha256_file
from zhllama.inputfile import MAX_LINE_BYTES
from zhllama.log import get_logger
from zhllama.vocab.train import read_sample

log = get_logger("zhllama.vocab.bpe_train")


def new_tokenizer_like(base_data: dict):
    """An empty byte-level BPE tokenizer with the base's normalizer, pre-tokenizer and decoder."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    skeleton = json.loads(Tokenizer(BPE()).to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        skeleton[key] = base_data.get(key)
    return Tokenizer.from_str(json.dumps(skeleton))


def train(inputs, out_dir, *, base, vocab_size=20000, max_sentences=2_000_000, max_sentence_length=4192,
          seed=42, text_field="text", strict=True, overwrite=False, min_frequency=2,
          max_line=MAX_LINE_BYTES) -> dict:
    """Train `out_dir/tokenizer.json` on `inputs` for the byte-level BPE `base`; returns its config."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size <= 256:
        raise UserError(f"--vocab-size must exceed the 256 byte tokens, not {vocab_size}")
    base_file = bpe.tokenizer_json_path(base)
    base_data = bpe.read_tokenizer_json(base)
    bpe.check_byte_level_bpe(base_data, base_file)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    sentences, info, _ = read_sample(inputs, max_sentences=max_sentences, max_sentence_length=max_sentence_length,
                                     seed=seed, text_field=text_field, strict=strict, max_line=max_line)
    t_read = time.perf_counter() - t0
    tok = new_tokenizer_like(base_data)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    t1 = time.perf_counter()
    tok.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    t_train = time.perf_counter() - t1
    config = {
        "command": "zhllama vocab train --base",
        "base": {"path": str(base_file), "sha256": sha256_file(base_file)},
        "inputs": [str(x) for x in inputs],
        "files": info["files"],
        "settings": {"vocab_size": vocab_size, "min_frequency": min_frequency, "model_type": "byte-level bpe",
                     "normalizer": "base's", "pre_tokenizer": "base's"},
        "sampling": {"max_sentences": max_sentences, "seed": seed, "sentences_seen": info["sentences_seen"],
                     "sentences_sampled": info["sentences_sampled"], "sampled": info["sampled"],
                     "characters_seen": info["characters_seen"]},
        "text_field": text_field,
        "corpus": info["corpus"],
        "pieces": tok.get_vocab_size(),
        "seconds": {"read": round(t_read, 3), "train": round(t_train, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "versions": _versions(),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        tok.save(str(tmp / bpe.TOKENIZER_JSON))
        config["model_sha256"] = sha256_file(tmp / bpe.TOKENIZER_JSON)
        atomic_write_json(tmp / "train_config.json", config)
    log.info("wrote %s/tokenizer.json (%d tokens) in %.1fs", out_dir, config["pieces"], config["seconds"]["total"])
    return config


def _versions() -> dict:
    return {"tokenizers": version("tokenizers")}
