"""One training run (stage1, stage2 or sft) on the DeepSpeed engine.

  zhllama train --config configs/stage1.yaml [key=value ...]

Runs alone (a world of one) or under the launcher, e.g.
  deepspeed --num_gpus 8 -m zhllama.app.cli train --config configs/stage2.yaml out=runs/stage2
(launch/*.sh wrap this for one or several nodes). Keys are those of configs/*.yaml; any of them can be
overridden as key=value. A run restarts from its latest complete checkpoint in OUT/checkpoints unless
resume=false. Outputs: OUT/config.yaml, metrics.jsonl, tensorboard/, checkpoints/step-N/, final/ (the
adapter with the trained embeddings, the tokenizer and the run config), and summary.json (the run's
summary, also printed as one JSON line at the end).
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from zhllama.fsutil import atomic_write_json, check_output_path
from zhllama.model_config import check_tokenizer_dir
from zhllama.modelio import check_checkpoint, meta_model
from zhllama.outlock import output_lock

from .adapter_files import read_adapter_dir, read_adapter_shapes
from .config import dump_config, load_config
from .hooks import hooks_from_env
from . import rope
from .presets import OVERRIDE_KEYS, grad_accumulation
from .stage_data import registered


def add_arguments(p):
    p.add_argument("--config", help="YAML run config (configs/stage1.yaml, stage2.yaml, sft.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. micro_batch=4; unset, these take the stage preset's value: "
                        + ", ".join(OVERRIDE_KEYS))
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print the resolved config and batch plan, and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume from OUT/checkpoints even though global batch, lr, stage, model or another "
                        "setting differs from the checkpoint's (by default such a resume is refused); implies "
                        "--allow-data-change")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume from OUT/checkpoints even though the data changed since the checkpoint (a pack "
                        "rebuilt from other text, edited SFT files): the run goes on at its step and data "
                        "position over the new data (by default such a resume is refused, naming what changed)")
    # The deepspeed launcher passes --local_rank; the engine reads LOCAL_RANK from the environment.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args):
    cfg = load_config(args.config, args.overrides)
    check_output_path(cfg.out, "run directory")
    stage_data = registered(cfg.stage)
    if stage_data is not None and stage_data.check is not None:
        stage_data.check(cfg)
    if not args.dry_run:
        check_checkpoint(cfg.model)  # unreadable or misshapen weights: one line, before any process group
        check_tokenizer_dir(cfg.tokenizer or cfg.model)  # code named in it, an unreadable tokenizer.json
        for adapter in cfg.init_adapters:
            read_adapter_shapes(read_adapter_dir(Path(adapter))[1])  # missing, damaged, naming code
    if cfg.preset().uses_lora and (Path(cfg.model) / "config.json").is_file():
        from .adapters import check_lora_targets   # torch: not for --help
        check_lora_targets(meta_model(cfg.model), cfg.preset().lora_targets)
    if args.dry_run:
        preset = cfg.preset()
        world = int(os.environ.get("WORLD_SIZE", 1))
        accum = grad_accumulation(preset.global_batch, cfg.micro_batch, world)
        sys.stdout.write(dump_config(cfg))
        print(f"# world {world} x micro {cfg.micro_batch} x accumulation {accum} = global batch "
              f"{preset.global_batch} sequences of {preset.block_size} tokens")
        change = rope.for_run(cfg) if (Path(cfg.model) / "config.json").is_file() else None
        if change is not None:
            print(f"# positions: {change.after.describe()}, from the base's {change.before.describe()}")
        return 0
    from .engine import Trainer, shutdown_distributed   # torch, DeepSpeed: only when training (--help stays light)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    # One run per run directory: rank 0 holds its lock, before any process group (a second launch's
    # rank 0 is refused naming the first; its launcher then stops its other ranks).
    with output_lock(cfg.out, "zhllama train", "run directory") if rank0 else contextlib.nullcontext():
        # The test seam: ZHLLAMA_CRASH / ZHLLAMA_NAN_STEPS become hooks here, once, never inside the loop.
        summary = Trainer(cfg, allow_config_change=args.allow_config_change,
                          allow_data_change=args.allow_data_change, hooks=hooks_from_env()).run()
        if rank0:
            atomic_write_json(Path(cfg.out) / "summary.json", summary)  # what scripts read; the line is for people
            print(json.dumps(summary))
    shutdown_distributed()  # a run that succeeded ends with every rank's exit code 0
    return 0
