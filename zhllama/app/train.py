"""`zhllama train`: pretrain/train.py's command, with every stage's data reader registered first.

A stage whose data format lives in its own folder (sft) registers a reader with the engine
(pretrain/stage_data.py); importing it here, on the application floor, keeps pretrain from importing
the stages above it (docs/architecture.md).
"""

import zhllama.sft.stage_data  # noqa: F401  (registers the sft stage's data reader)
from zhllama.pretrain import train as train_command

add_arguments, run = train_command.add_arguments, train_command.run
__doc__ = train_command.__doc__  # `zhllama train --help` shows the command's own description
