"""Publish: merge adapters into a plain HF checkpoint, generate, evaluate, serve.

Imported as `zhllama.export`; uses `zhllama.pretrain`'s model I/O.
"""
