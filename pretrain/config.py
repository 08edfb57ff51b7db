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
    new_rows_only: bool = False  # stage1: train only rows of tokens added by the merge
    # context extension (pretrain/rope.py): {type: linear|dynamic|yarn|llama3, factor: F} and/or the target length
    rope_scaling: Optional[dict] = None
    context_length: Optional[int] = None
    # engine
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    ds_config: str = "zero2"  # a name in ds_configs/ or a JSON path
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


def _coerce(key: str, value, where: str):
    """Check a value against the field's type; YAML already parsed numbers, lists and booleans."""
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
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
    return key, value


def load_config(path=None, overrides=()) -> RunConfig:
    """Read a YAML config and apply `key=value` overrides (relative paths are relative to the working directory)."""
    values = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config "
                              "as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no model or data: fail before any compute."""
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
        raise ConfigError("config: key 'new_rows_only' applies to stage1 only")
    for key in ("micro_batch", "save_every", "log_every", "keep_last", "max_nonfinite_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config: key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"config: key 'max_steps' must be >= 1, got {cfg.max_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"config: key 'min_lr_ratio' must be in [0, 1], got {cfg.min_lr_ratio}")
    _check_ranges(cfg)
    check_request(cfg.rope_scaling, cfg.context_length)


_finite = math.isfinite
# The range each stage preset override must hold once resolved (the config's value, else the preset's),
# keyed like OVERRIDE_KEYS; `betas` and `lora_targets` are checked for their shape below.
PRESET_RANGES = {
    "lr": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "global_batch": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "block_size": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of the steps)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: _finite(v) and v >= 0, "a number >= 0 (0: no clipping)"),
    "lora_r": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _check_ranges(cfg: RunConfig) -> None:
    """Value ranges of the resolved hyperparameters (the config's, else the stage preset's), so a
    negative or NaN lr, an r of 0 or a dropout of 1.5 fails here, not after the model has loaded.
    Whether `lora_targets` name real modules is checked when the model is built."""
    p = cfg.preset()

    def need(key, value, ok, what):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"config: key '{key}' must be {what}, got {value!r}")

    for key in OVERRIDE_KEYS:
        if key.startswith("lora_") and not p.uses_lora:
            continue  # stage1: no LoRA, its lora_* values are unused
        value = getattr(p, key)
        if key == "betas":
            betas = list(value)
            if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                          for b in betas):
                raise ConfigError(f"config: key 'betas' must be two numbers in [0, 1), e.g. [0.9, 0.95], "
                                  f"got {betas}")
        elif key == "lora_targets":
            targets = list(value)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"config: key 'lora_targets' must be a non-empty list of module names "
                                  f"(e.g. [q_proj, v_proj]), got {targets}")
        else:
            need(key, value, *PRESET_RANGES[key])
    need("epochs", cfg.epochs, lambda v: _finite(v) and v > 0, "a number > 0")
    need("eval_batches", cfg.eval_batches, lambda v: v >= 1, "an integer >= 1")
    need("eval_every", cfg.eval_every, lambda v: v >= 0, "an integer >= 0 (0: only at the end)")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
