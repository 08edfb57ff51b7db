"""The sft stage's data for the training engine: instruction records through a prompt template.

Importing this module registers it with pretrain/stage_data.py; `zhllama train` does (zhllama/app/train.py).
"""

from zhllama.corpus import expand_inputs, parse_weighted_spec
from zhllama.fsutil import sha256_file
from zhllama.pretrain.stage_data import Data, StageData, register

from .templates import get_template


def build(cfg, preset, tokenizer) -> Data:
    from .dataset import SFTDataset, default_pad_id, make_collate  # torch: only when training (`train --help` stays light)

    train = SFTDataset(cfg.data, tokenizer, cfg.template, max_length=preset.block_size,
                       strict=cfg.strict_data, field_map=cfg.field_map or None, seed=cfg.seed,
                       pack=cfg.pack_examples)
    return Data(train, None, make_collate(default_pad_id(tokenizer)),
                f"{len(train):,} SFT {'sequences' if cfg.pack_examples else 'examples'} "
                f"(template {cfg.template}, max length {preset.block_size})")


def run_record(cfg) -> dict:
    """The template's full definition, not only its name: `zhllama merge` writes the chat template from it,
    even for a user's template file."""
    return {"template_spec": get_template(cfg.template).to_dict()}


def run_files(cfg) -> dict:
    return {"template.json": run_record(cfg)["template_spec"]}


def check(cfg) -> None:
    """The template reads (a file: bounded YAML, known keys) before any model is loaded."""
    get_template(cfg.template)


def fingerprint(cfg) -> dict:
    """The sha256 of every input file, per data spec: a checkpoint records it, and a resume on changed
    files is refused (pretrain/checkpoint.py)."""
    out = {}
    for spec in cfg.data:
        path_spec, _ = parse_weighted_spec(spec)
        out[str(spec)] = {"sha256 of": {str(p): sha256_file(p) for p in expand_inputs([path_spec])}}
    return out


register("sft", StageData(build=build, run_record=run_record, run_files=run_files, fingerprint=fingerprint,
                          check=check))
