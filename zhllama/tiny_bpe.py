"""Tiny byte-level BPE tokenizers (GPT-2 / SmolLM2 style and LLaMA-3 style) and tiny LLaMA-3-shaped
models, trained and built locally for the tests and benches of the byte-level BPE path.

LLaMA-3 style means what its tokenizer.json has: a Split pre-tokenizer with LLaMA-3's regex, then
ByteLevel without its own regex; `ignore_merges`; 256 special tokens after the vocabulary
(`<|begin_of_text|>`, `<|end_of_text|>`, ...reserved...) with a post-processor that prepends
`<|begin_of_text|>`. The model side: grouped-query attention, rope_theta 500,000, tied embeddings
(LLaMA-3.2 1B/3B).
"""

import json
from pathlib import Path
from typing import Iterable, Optional

from .model_config import TRUST_REMOTE_CODE

# LLaMA-3's pre-tokenizer regex (tokenizer.json of Meta-Llama-3): contractions, letters, 1-3 digits,
# punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def make_byte_level_bpe(out_dir, texts: Iterable[str], *, vocab_size: int = 600, style: str = "gpt2",
                        n_reserved: int = 5) -> Path:
    """Train a tiny byte-level BPE tokenizer on `texts` and save it as an HF tokenizer directory.

    style "gpt2" (SmolLM2-like): ByteLevel pre-tokenizer, `<|endoftext|>` as id 0, BOS = EOS = it.
    style "llama3": the LLaMA-3 layout described in the module doc, `n_reserved` extra reserved tokens.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers, Regex
    from tokenizers.models import BPE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    if style == "gpt2":
        tok = Tokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        bos = eos = "<|endoftext|>"
        specials = ["<|endoftext|>"]
    elif style == "llama3":
        tok = Tokenizer(BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + n_reserved)]
        tok.add_special_tokens(specials)        # ids after the whole vocabulary, as in LLaMA-3
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        raise ValueError(f"unknown style {style!r}")
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "model_max_length": 2048, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True, "lstrip": False,
                                                            "rstrip": False, "normalized": False,
                                                            "single_word": False} for s in specials}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


def make_tiny_llama3(tokenizer_dir, out_dir, *, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     tie_word_embeddings=True, seed=0, vocab_size: Optional[int] = None) -> Path:
    """A tiny random LLaMA-3-shaped checkpoint (GQA, rope_theta 500,000, tied embeddings by default)
    for a tokenizer.json tokenizer, saved with it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=TRUST_REMOTE_CODE)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      intermediate_size=hidden_size * 3, max_position_embeddings=256, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
