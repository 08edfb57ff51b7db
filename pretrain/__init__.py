"""Continued pretraining: corpus -> packed token shards, the DeepSpeed engine, stage presets, planner.

Imported as `zhllama.pretrain`.
"""
