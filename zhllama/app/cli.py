"""The `zhllama` command line.

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args)`. Modules
are imported only when their command runs, so `zhllama --help` and light commands never pay for
importing torch or deepspeed.
"""

import argparse
import importlib
import importlib.util
import sys

from zhllama import __version__
from zhllama.errors import UserError, disk_full_error
from zhllama.log import setup_logging

# name -> (module, one-line summary). A name with a space is a subcommand of a group.
COMMANDS = {
    "vocab train": ("zhllama.vocab.train", "train the Chinese SentencePiece model on text files"),
    "vocab merge": ("zhllama.vocab.merge", "merge Chinese pieces into the LLaMA tokenizer"),
    "vocab report": ("zhllama.vocab.report", "compare tokenizers on text: tokens/char, reachability, parity"),
    "vocab resize": ("zhllama.vocab.resize", "resize embed_tokens/lm_head of a checkpoint to a merged tokenizer"),
    "data pack": ("zhllama.pretrain.pack", "tokenize and pack a corpus into token shards"),
    "train": ("zhllama.app.train", "one training run (stage1, stage2, sft) on the DeepSpeed engine"),
    "plan": ("zhllama.pretrain.plan", "trainable params, memory, FLOPs and GPU-hours of a run"),
    "merge": ("zhllama.export.merge", "merge LoRA adapters and trained embeddings into a full HF checkpoint"),
    "generate": ("zhllama.export.generate", "generate text with a checkpoint and a prompt template"),
    "eval": ("zhllama.export.evaluate", "perplexity, bits per character and tokens/s on held-out text"),
    "serve": ("zhllama.export.serve", "OpenAI-compatible HTTP server for a checkpoint"),
    "selfinstruct": ("zhllama.sft.selfinstruct", "Alpaca-style self-instruct against an OpenAI-compatible API"),
    "translate": ("zhllama.sft.translate", "translate instruction data into Chinese through an API"),
    "demo": ("zhllama.app.demo", "the whole pipeline on a tiny model, on CPU, in minutes"),
}


def _available():
    """Commands whose module is present in this installation."""
    out = {}
    for name, (module, summary) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, summary)
    return out


def _usage(commands, group=None) -> str:
    lines = [f"zhllama {__version__}: teach an English LLaMA Chinese.", "",
             "usage: zhllama <command> [options]   (zhllama <command> --help for details)", "",
             "commands:"]
    for name, (_, summary) in commands.items():
        if group is None or name.startswith(group + " "):
            lines.append(f"  {name:<16} {summary}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    commands = _available()
    groups = {name.split(" ")[0] for name in commands if " " in name}

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    if argv[0] == "--version":
        print(f"zhllama {__version__}")
        return 0

    if argv[0] in groups:
        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print(_usage(commands, group=argv[0]))
            return 0 if len(argv) >= 2 else 2
        name, rest = f"{argv[0]} {argv[1]}", argv[2:]
    else:
        name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"zhllama: error: unknown command '{name}'\n\n{_usage(commands)}", file=sys.stderr)
        return 2

    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(
        prog=f"zhllama {name}", description=(module.__doc__ or commands[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(rest)

    setup_logging(args.verbose)
    try:
        code = module.run(args)
    except UserError as e:
        print(f"zhllama {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zhllama {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        full = disk_full_error(e, getattr(args, "out", None))   # a full disk is the user's to fix too
        if full is None:
            raise
        print(f"zhllama {name}: error: {full}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
