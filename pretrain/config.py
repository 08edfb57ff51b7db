"""Run configuration: one YAML file per run, `key=value` overrides from the command line.

Keys left unset (null) take the stage preset's value (`pretrain/presets.py`), so `configs/stage1.yaml`
only needs paths. Unknown keys and bad values are a `ConfigError` naming the key, raised before any
model is loaded.
"""

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from zhllama.errors import ConfigError
from zhllama.model_config import gb
from zhllama.modelio import read_model_config
from zhllama.yamlio import load_yaml, read_yaml_file

from .budget import check_run_fits
from .presets import OVERRIDE_KEYS, get_stage
from .rope import check_request


@dataclass
class RunConfig:
    # what to train
    stage: str = "stage1"
    model: str = ""  # HF checkpoint dir (already resized to the tokenizer)
    tokenizer: Optional[str] = None  # default: the model dir
    init_adapters: List[str] = field(default_factory=list)  # earlier stages' final/ dirs, merged in order first
    out: str = ""  # run directory
    # data
    data: List[str] = field(default_factory=list)  # pretrain: a `data pack` dir; sft: instruction files
    template: str = "alpaca"  # sft prompt template
    field_map: dict = field(default_factory=dict)  # sft: other field names -> instruction/input/output
    strict_data: bool = False  # sft: fail on the first bad record instead of counting and skipping
    pack_examples: bool = False  # sft: pack short examples into one sequence (attention kept per example)
    # batch and schedule (null: the stage preset's value)
    global_batch: Optional[int] = None
    micro_batch: int = 1
    block_size: Optional[int] = None  # pretrain: must equal the pack's block size; sft: max length
    max_steps: Optional[int] = None  # default: one pass over the training data
    epochs: float = 1.0
    lr: Optional[float] = None
    min_lr_ratio: float = 0.0
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[List[float]] = None
    grad_clip: Optional[float] = None
    # what is trained (null: the preset's)
    lora_r: Optional[int] = None
    lora_alpha: Optional[int] = None
    lora_dropout: Optional[float] = None
    lora_targets: Optional[List[str]] = None
    new_rows_only: bool = False  # stage1: train only rows of tokens added by the merge (= embed_lr_base: 0)
    # learning rates of the vocabulary rows, as multiples of the stage lr (pretrain/row_groups.py); they need
    # the base vocab size `zhllama vocab resize` records. null: 1, or 0 with new_rows_only. 0 freezes them.
    embed_lr_base: Optional[float] = None  # the base's own rows of embed_tokens (and of an untied lm_head)
    embed_lr_new: float = 1.0  # the rows the merge added
    # context extension (pretrain/rope.py): {type: linear|dynamic|yarn|llama3, factor: F} and/or the target length
    rope_scaling: Optional[dict] = None
    context_length: Optional[int] = None
    # engine
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: Union[bool, str] = "auto"  # auto: on when the plan's estimate does not fit the GPU
    ds_config: Optional[str] = None  # a name in ds_configs/ or a JSON path; null: the stage's (ds_config.py)
    seed: int = 42
    # bookkeeping
    log_every: int = 1
    eval_every: int = 0  # steps; 0: only at the end
    eval_batches: int = 16  # validation micro-batches per rank
    save_every: int = 100
    keep_last: int = 2
    resume: bool = True  # restart from the latest complete checkpoint in out/checkpoints
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    tensorboard: bool = True

    def preset(self):
        """The stage preset with this config's overrides applied."""
        base = get_stage(self.stage)
        changes = {}
        for key in OVERRIDE_KEYS:
            value = getattr(self, key)
            if value is not None:
                changes[key] = tuple(value) if isinstance(value, list) else value
        return base.with_overrides(**changes)

    def row_lr_scales(self) -> tuple:
        """(base rows, new rows): the vocabulary rows' learning rates as multiples of the stage lr."""
        base = self.embed_lr_base if self.embed_lr_base is not None else (0.0 if self.new_rows_only else 1.0)
        return base, self.embed_lr_new

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = get_type_hints(RunConfig)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(_FIELDS)}")


def _field_kind(key: str):
    """(type, item type or None, may be null) of a RunConfig field, from its annotation:
    Optional[List[float]] -> (list, float, True), int -> (int, None, False)."""
    tp, nullable = _HINTS[key], False
    if get_origin(tp) in (Union, types.UnionType):  # Optional[X], X | None
        args = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(args) < len(get_args(tp))
        (tp,) = args
    origin, args = get_origin(tp) or tp, get_args(tp)
    return origin, (args[0] if origin is list and args else None), nullable


AUTO_KEYS = ("gradient_checkpointing",)  # true, false or auto (decided when the run starts)


def _coerce(key: str, value, where: str):
    """Check a value against the field's type; YAML already parsed numbers, lists and booleans."""
    if key in AUTO_KEYS:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _BOOL_WORDS):
            return _scalar(key, value, bool, where)
        raise ConfigError(f"{where}: key '{key}' must be true, false or auto, got {value!r}")
    kind, item, nullable = _field_kind(key)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where}: key '{key}' may not be null")
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        return [_scalar(key, v, item, where) for v in value] if item is not None else value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return value
    return _scalar(key, value, kind, where)


def _scalar(key: str, value, kind, where: str):
    """One value of type bool, int, float or str (a field or a list item)."""
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]  # a quoted "false" in a YAML file
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"RunConfig.{key}: no parser for type {kind!r}")


def parse_override(item: str):
    """'key=value' -> (key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    return key, (load_yaml(raw, f"override '{item}'", "YAML value") if raw != "" else "")


def load_config(path=None, overrides=()) -> RunConfig:
    """Read a YAML config and apply `key=value` overrides (relative paths are relative to the working directory)."""
    values = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        loaded = read_yaml_file(path, "run config file") or {}   # missing, a FIFO, a broken link: one line
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys to values")
        for key, value in loaded.items():
            if key not in _FIELDS:
                raise _unknown_key(key, where)
            values[key] = _coerce(key, value, where)
    for item in overrides:
        key, value = parse_override(item)
        if key not in _FIELDS:
            raise _unknown_key(key, "command line")
        values[key] = _coerce(key, value, "command line")
    cfg = RunConfig(**values)
    validate(cfg, _model_config(cfg))
    return cfg


def _model_config(cfg: RunConfig) -> Optional[dict]:
    """The model's config.json when there is one (checked: no code, dimensions in range), for the memory
    estimate; None when the model is not there yet (`--dry-run` of a config written ahead)."""
    if cfg.model and isinstance(cfg.model, str) and (Path(cfg.model) / "config.json").is_file():
        return read_model_config(cfg.model)
    return None


def validate(cfg: RunConfig, model_config: Optional[dict] = None) -> None:
    """Checks that need no data, before any compute: required keys, every value in its range (`RANGES`),
    and, given the model's config.json (`model_config`), that the run's memory fits
    (`pretrain/budget.py`: checked before the upper limits, so a huge value is refused with its estimate)."""
    cfg.preset()  # unknown stage -> ConfigError
    if not cfg.model:
        raise ConfigError("config: key 'model' is required (an HF checkpoint directory)")
    if not cfg.out:
        raise ConfigError("config: key 'out' is required (the run directory)")
    if not cfg.data:
        raise ConfigError("config: key 'data' is required")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"config: key 'precision' must be auto, bf16, fp16 or fp32, got '{cfg.precision}'")
    if cfg.new_rows_only and cfg.stage != "stage1":
        raise ConfigError("config: key 'new_rows_only' applies to stage1 only (stage2 and sft: embed_lr_base: 0)")
    if cfg.new_rows_only and cfg.embed_lr_base not in (None, 0):
        raise ConfigError(f"config: keys 'new_rows_only' and 'embed_lr_base' disagree: new_rows_only freezes the base "
                          f"rows, embed_lr_base is {cfg.embed_lr_base}; set one of them")
    for key in ("data", "init_adapters"):
        if not all(isinstance(x, str) and x for x in getattr(cfg, key)):
            raise ConfigError(f"config: key '{key}' must be a list of paths, got {getattr(cfg, key)!r:.200}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.field_map.items()):
        raise ConfigError(f"config: key 'field_map' must map field names to field names, got {cfg.field_map!r:.200}")
    _check_ranges(cfg, upper=False)
    check_request(cfg.rope_scaling, cfg.context_length)
    if model_config is not None:
        check_run_fits(cfg, model_config, Path(cfg.model) / "config.json")
    _check_ranges(cfg, upper=True)


_finite = math.isfinite
# key -> (lowest, highest, what it is) of every number of a run config. The highest values are far beyond
# any real run (LLaMA: 2,048 sequences of 2,048 tokens per step; LoRA ranks in use: <= 256) and bound what
# the engine allocates from them. The preset's keys (OVERRIDE_KEYS) are checked on the resolved value: the
# config's, else the stage preset's.
RANGES = {
    "lr": (0.0, 10.0, "a learning rate > 0"),
    "global_batch": (1, 1 << 20, "sequences per optimizer step"),
    "block_size": (2, 1 << 20, "tokens per sequence"),
    "micro_batch": (1, 1 << 16, "sequences per forward pass"),
    "warmup_ratio": (0.0, 1.0, "a fraction of the steps"),
    "min_lr_ratio": (0.0, 1.0, "a fraction of the peak lr"),
    "weight_decay": (0.0, 10.0, "AdamW's decoupled weight decay"),
    "grad_clip": (0.0, 1e6, "a gradient norm (0: no clipping)"),
    "lora_r": (1, 1 << 16, "a LoRA rank"),
    "lora_alpha": (0.0, 1e6, "LoRA's alpha > 0"),
    "lora_dropout": (0.0, 1.0, "a dropout probability below 1"),
    "max_steps": (1, 10 ** 9, "optimizer steps"),
    "epochs": (0.0, 1e4, "passes over the data > 0"),
    "eval_batches": (1, 10 ** 6, "validation micro batches per rank"),
    "eval_every": (0, 10 ** 9, "steps (0: only at the end)"),
    "save_every": (1, 10 ** 9, "steps"),
    "log_every": (1, 10 ** 9, "steps"),
    "keep_last": (1, 10 ** 4, "checkpoints kept"),
    "max_nonfinite_steps": (1, 10 ** 6, "non-finite steps in a row"),
    "seed": (0, 2 ** 32 - 1, "a seed"),
    "embed_lr_base": (0.0, 1e4, "a multiple of the stage lr for the base's rows; 0 freezes them"),
    "embed_lr_new": (0.0, 1e4, "a multiple of the stage lr for the rows the merge added, > 0"),
}
OPEN_BELOW = ("lr", "lora_alpha", "epochs", "embed_lr_new")  # must be > lowest
OPEN_ABOVE = ("lora_dropout",)                              # must be < highest


def _size_note(key: str, value, p) -> str:
    """What an out-of-range size would cost, for the message (no model needed)."""
    if key == "global_batch":
        return (f": {value * p.block_size:.3g} tokens per optimizer step, {gb(8 * value * p.block_size)} of token "
                "ids gathered for each step")
    if key == "micro_batch":
        return f": {value * p.block_size:.3g} tokens in one forward pass"
    if key == "block_size":
        return f": {value:.3g} tokens per sequence, {gb(8 * value * p.global_batch)} of token ids per step"
    if key == "lora_r":
        return ": a rank wider than any layer; each adapted matrix would need 16 x r x (in + out) bytes"
    return ""


def _check_ranges(cfg: RunConfig, upper: bool) -> None:
    """Every number of the config, resolved against the stage preset, within RANGES: a negative or NaN
    lr, an r of 0 or a dropout of 1.5 fails here, not after the model has loaded. With `upper` False
    only the types and lower limits, with True the upper limits too (with what the value would cost).
    Whether `lora_targets` name real modules is checked when the model is built."""
    p = cfg.preset()
    for key, (lo, hi, what) in RANGES.items():
        if key.startswith("lora_") and not p.uses_lora:
            continue  # stage1: no LoRA, its lora_* values are unused
        value = getattr(p, key) if key in OVERRIDE_KEYS else getattr(cfg, key)
        if key in ("max_steps", "embed_lr_base") and value is None:
            continue  # null: one pass over the data; 1 (0 with new_rows_only)
        integer = isinstance(lo, int)
        ok_type = not isinstance(value, bool) and (isinstance(value, int) if integer else
                                                   isinstance(value, (int, float)) and _finite(value))
        low_ok = ok_type and (value > lo if key in OPEN_BELOW else value >= lo)
        high_ok = low_ok and (value < hi if key in OPEN_ABOVE else value <= hi)
        if not low_ok or (upper and not high_ok):
            bounds = f"{'(' if key in OPEN_BELOW else '['}{lo:,}, {hi:,}{')' if key in OPEN_ABOVE else ']'}"
            kind = "an integer" if integer else "a number"
            note = _size_note(key, value, p) if low_ok else ""
            raise ConfigError(f"config: key '{key}' must be {kind} in {bounds} ({what}), got {value!r}{note}")
    betas = list(p.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"config: key 'betas' must be two numbers in [0, 1), e.g. [0.9, 0.95], got {betas}")
    if p.uses_lora:
        targets = list(p.lora_targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"config: key 'lora_targets' must be a non-empty list of module names "
                              f"(e.g. [q_proj, v_proj]), got {targets}")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
