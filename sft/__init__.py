"""Instruction SFT: records, prompt templates, label masking, self-instruct generation.

Imported as `zhllama.sft`; may use `zhllama.pretrain`.
"""
