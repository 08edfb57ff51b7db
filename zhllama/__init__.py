"""zhllama: teach an English LLaMA Chinese.

The stage folders of the repository (`vocab/`, `pretrain/`, `sft/`, `export/`) are installed as
`zhllama.vocab`, `zhllama.pretrain`, ...; this package holds what every stage shares: the CLI,
errors, corpus reading, atomic file output, logging and model/tokenizer I/O.
"""

__version__ = "0.1.0"
