"""The DeepSpeed JSON of a run: found by name or path, every 'auto' filled from the run config.

Its own module (not the engine's) because the planner reads the same files without importing the
engine, and the engine asks the planner whether gradient checkpointing is needed.
"""

import json
from importlib import resources
from pathlib import Path

import torch

from zhllama.errors import ConfigError

from .precision import with_bf16_nan_safety

SHIPPED = ("zero1", "zero2", "zero2_offload")  # ds_configs/*.json
# ds_config: null takes the stage's. Every stage runs under ZeRO-2 (the project's contract): on the
# clusters zhllama is built for (8 A100s on NVLink, or 16 over InfiniBand) its per-micro-batch gradient
# traffic costs a few percent of a step. ZeRO-1 (`ds_config=zero1`) reduces once per step instead, for
# 2 T (1 - 1/N) bytes more per GPU: the choice for nodes joined by Ethernet (`zhllama plan` prints both;
# docs/cluster.md, "ZeRO-1 or ZeRO-2").
STAGE_DS_CONFIG = {"stage1": "zero2", "stage2": "zero2", "sft": "zero2", "full": "zero2"}


def stage_ds_config(stage: str, configured=None) -> str:
    """The ds_config a run of `stage` uses: the configured one, else the stage's default."""
    return configured or STAGE_DS_CONFIG.get(stage, "zero2")


def resolve_ds_config(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config: ds_config '{name_or_path}' not found")
        return p
    candidate = resources.files("zhllama.ds_configs") / f"{name_or_path}.json"
    if not candidate.is_file():
        raise ConfigError(f"config: ds_config '{name_or_path}' is neither a JSON file nor one of "
                          f"{', '.join(SHIPPED)}")
    return Path(str(candidate))


def build_ds_config(path: Path, *, global_batch, micro_batch, grad_accum, grad_clip, precision) -> dict:
    """The DeepSpeed JSON with every 'auto' filled from the run config, and bf16's NaN check set."""
    cfg = json.loads(Path(path).read_text())
    cfg.pop("_comment", None)
    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["gradient_clipping"] = grad_clip
    cfg.setdefault("bf16", {})["enabled"] = precision == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = precision == "fp16"
    if precision != "fp16":
        cfg.pop("fp16")
    if not torch.cuda.is_available():
        # overlap_comm needs CUDA streams; on CPU it only adds copies.
        cfg.get("zero_optimization", {})["overlap_comm"] = False
    return with_bf16_nan_safety(cfg)
