"""Vocabulary stage: Chinese SentencePiece training, merge into LLaMA, tokenizer report, embedding resize.

Imported as `zhllama.vocab`. Uses the shared core (`zhllama.*`) only: never `pretrain` or `sft`.
"""
