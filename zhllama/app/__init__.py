"""The application floor: the `zhllama` command line and the end-to-end demo.

It sits on top of the stages (vocab, pretrain, sft, export) and the core; nothing below imports it.
See docs/architecture.md.
"""
