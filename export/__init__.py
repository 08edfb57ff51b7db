"""Publish: merge adapters into a plain HF checkpoint, generate, evaluate, serve.

Imported as `zhllama.export`; reads the adapter files of `zhllama.pretrain` and the templates of
`zhllama.sft`; model and tokenizer I/O is the core's (`zhllama.modelio`).
"""
