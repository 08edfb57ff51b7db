"""Context extension: the RoPE scaling a stage trains with, and the config.json keys that carry it.

A stage config asks for a longer context with two keys (docs/training.md, "Long context"):

    rope_scaling: {type: linear, factor: 8}     # linear | dynamic | yarn | llama3
    context_length: 2048                         # the target; give it, the factor, or both (they must agree)

zhllama writes no attention code: transformers computes every RoPE type itself (`ROPE_INIT_FUNCTIONS`),
from the model's config. What this module owns is that config: reading a base's positions from its
config.json (transformers 4.x `rope_scaling` + `rope_theta`, or 5.x `rope_parameters`), extending them,
and writing them back in a form that transformers 4.x, 5.x, vLLM and llama.cpp's converter read alike.

Extending a base that already scales RoPE (LLaMA-3.1's `llama3`, a YaRN or an interpolated model)
starts from its own settings: the request's factor multiplies the base's (positions are divided by
both), `original_max_position_embeddings` and the type's other keys are kept. Mixing two types (a
linear request on a llama3 base) cannot be written as one transformers config and is refused.

Where the target length goes, per type (the conventions of the libraries that read it):

  linear, dynamic   max_position_embeddings stays the length the scaling is relative to (L0);
                    context = L0 x factor. Dynamic NTK needs L0 there (it starts scaling past it),
                    vLLM derives its max_model_len as max_position_embeddings x factor, and
                    transformers 4.40 accepts rope_scaling only as exactly {type, factor > 1.0}.
  yarn, llama3      max_position_embeddings = the target, original_max_position_embeddings = L0 kept
                    (the layout LLaMA-3.1 and DeepSeek-V3 ship; transformers 5 warns when a yarn config's
                    max / original is not its factor, and vLLM takes original x factor for yarn).

This module imports no torch or transformers at the top: `zhllama merge` and the config checks use it.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from zhllama.errors import ConfigError, UserError
from zhllama.log import get_logger
from zhllama.modelio import read_model_config

from .adapter_files import read_adapter_dir

log = get_logger(__name__)

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
DEFAULT_THETA = 10000.0          # transformers' LLaMA default when a config names none
LLAMA3_DEFAULTS = (("high_freq_factor", 4.0), ("low_freq_factor", 1.0))   # Meta's LLaMA-3.1 values
# Keys a request may add for its type (beyond type and factor), and the ones a base may carry.
REQUEST_KEYS = {"linear": (), "dynamic": (), "yarn": ("beta_fast", "beta_slow", "attention_factor"),
                "llama3": ("low_freq_factor", "high_freq_factor")}
_OWN_KEYS = ("type", "rope_type", "factor", "rope_theta", "original_max_position_embeddings")


@dataclass(frozen=True)
class Rope:
    """A model's positions, as its config says: the RoPE type and factor, theta, max_position_embeddings,
    the original length (yarn, llama3) and the type's other keys."""

    type: str                               # default | linear | dynamic | yarn | llama3
    factor: float                           # 1.0 when unscaled
    theta: float
    max_position_embeddings: int
    original: Optional[int] = None          # original_max_position_embeddings (yarn, llama3)
    extra: Tuple[Tuple[str, object], ...] = field(default=())   # sorted (key, value): low_freq_factor, ...

    @property
    def context_length(self) -> int:
        """The longest sequence the config is meant for."""
        if self.type in ("linear", "dynamic"):
            return int(round(self.max_position_embeddings * self.factor))
        return int(self.max_position_embeddings)

    def to_dict(self) -> dict:
        """JSON for the run record (`rope` in zhllama_adapter.json) and the merge report."""
        out = {"type": self.type, "factor": self.factor, "rope_theta": self.theta,
               "max_position_embeddings": self.max_position_embeddings, "context_length": self.context_length}
        if self.original is not None:
            out["original_max_position_embeddings"] = self.original
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Rope":
        extra = {k: v for k, v in d.items() if k not in ("type", "factor", "rope_theta", "max_position_embeddings",
                                                         "context_length", "original_max_position_embeddings")}
        return cls(type=d["type"], factor=float(d["factor"]), theta=float(d["rope_theta"]),
                   max_position_embeddings=int(d["max_position_embeddings"]),
                   original=d.get("original_max_position_embeddings"), extra=tuple(sorted(extra.items())))

    def describe(self) -> str:
        """One line for logs and the model card."""
        if self.type == "default":
            return f"{self.context_length:,} tokens (RoPE unscaled, theta {self.theta:g})"
        base = self.original if self.original is not None else self.max_position_embeddings
        return (f"{self.context_length:,} tokens (RoPE {self.type} scaling, factor {self.factor:g} over "
                f"{base:,}, theta {self.theta:g})")


# ---------------------------------------------------------------------------------------------- reading

def read_rope(config: dict, where="config.json") -> Rope:
    """The positions a raw config.json dict describes, in either transformers format.

    Precedence as transformers 5 reads a config: `rope_scaling` (4.x) first, else `rope_parameters`;
    theta from the scaling dict, else the top-level `rope_theta`, else `rope_parameters`, else 10000."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: 'rope_parameters' must be a mapping, got {params!r}")
    scaling = config.get("rope_scaling") or params
    if not isinstance(scaling, dict):
        raise UserError(f"{where}: 'rope_scaling' must be a mapping, got {scaling!r}")
    if any(isinstance(v, dict) for v in scaling.values()):
        raise UserError(f"{where}: per-layer-type RoPE parameters are not a LLaMA config; zhllama extends "
                        "models with one RoPE for every layer")
    rtype = scaling.get("rope_type") or scaling.get("type") or "default"
    if rtype != "default" and rtype not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE type {rtype!r}: zhllama extends unscaled models and "
                        f"{', '.join(ROPE_TYPES)} scaling")
    max_pos = config.get("max_position_embeddings")
    if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos < 1:
        raise UserError(f"{where}: 'max_position_embeddings' must be a positive integer, got {max_pos!r}")
    theta = scaling.get("rope_theta", config.get("rope_theta", params.get("rope_theta", DEFAULT_THETA)))
    factor = 1.0
    if rtype != "default":
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise UserError(f"{where}: RoPE {rtype} scaling needs a 'factor' >= 1, got {factor!r}")
    original = None
    if rtype in ("yarn", "llama3"):
        original = scaling.get("original_max_position_embeddings") or config.get(
            "original_max_position_embeddings") or max_pos       # transformers 5's default
    extra = {k: v for k, v in scaling.items() if k not in _OWN_KEYS} if rtype != "default" else {}
    return Rope(rtype, float(factor), float(theta), int(max_pos), original, tuple(sorted(extra.items())))


def config_dict(config) -> dict:
    """A transformers config object's dict (`to_dict`; another object's attributes), or a dict as it is."""
    if isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else vars(config)


def context_length(config) -> Optional[int]:
    """The context a model config (a dict or a transformers config) is meant for: max_position_embeddings
    x factor for linear and dynamic scaling, max_position_embeddings otherwise (None when it has none).
    Lenient where `read_rope` is strict: serving a model of another RoPE type must not fail here."""
    d = config_dict(config)
    max_pos = d.get("max_position_embeddings")
    if not isinstance(max_pos, int) or isinstance(max_pos, bool):
        return None
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        return max_pos
    factor = scaling.get("factor")
    if scaling.get("rope_type", scaling.get("type")) in ("linear", "dynamic") and not isinstance(factor, bool) \
            and isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1:
        return int(round(max_pos * factor))
    return max_pos


# ---------------------------------------------------------------------------------------------- requests

def check_request(rope_scaling, context_length_) -> None:
    """The run config's `rope_scaling` / `context_length` keys, checked before any model is read."""
    if rope_scaling is None:
        if context_length_ is not None:
            raise ConfigError("config: key 'context_length' needs 'rope_scaling' (e.g. {type: linear}) to say how "
                              "positions are extended")
        return
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"config: key 'rope_scaling' must be a mapping like {{type: linear, factor: 4}}, "
                          f"got {rope_scaling!r}")
    rtype = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"config: key 'rope_scaling': type must be one of {', '.join(ROPE_TYPES)}, got {rtype!r}")
    allowed = {"type", "rope_type", "factor", *REQUEST_KEYS[rtype]}
    unknown = sorted(set(rope_scaling) - allowed)
    if unknown:
        raise ConfigError(f"config: key 'rope_scaling': unknown key(s) {', '.join(unknown)} for type {rtype}; "
                          f"known: {', '.join(sorted(allowed))}")
    for key in ("factor", *REQUEST_KEYS[rtype]):
        value = rope_scaling.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config: key 'rope_scaling.{key}' must be a number > 0, got {value!r}")
    factor = rope_scaling.get("factor")
    if factor is not None and factor <= 1:
        raise ConfigError(f"config: key 'rope_scaling.factor' must be > 1 (it multiplies the context), got {factor!r}")
    if context_length_ is not None and (isinstance(context_length_, bool) or not isinstance(context_length_, int)
                                        or context_length_ < 2):
        raise ConfigError(f"config: key 'context_length' must be an integer >= 2, got {context_length_!r}")
    if factor is None and context_length_ is None:
        raise ConfigError("config: key 'rope_scaling' needs a 'factor', or give the target as 'context_length'")


def extend(base: Rope, rope_scaling: dict, target: Optional[int] = None) -> Rope:
    """`base` extended as the run config asks (`check_request` has passed): the request's factor (or
    target / base context) multiplies the base's own factor; a scaled base keeps its type's keys."""
    rtype = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if base.type != "default" and base.type != rtype:
        raise ConfigError(f"config: key 'rope_scaling': the model already uses {base.type} RoPE scaling (factor "
                          f"{base.factor:g}); extend it with type {base.type} (the factors multiply) or start from an "
                          f"unscaled model: one transformers config holds one RoPE type")
    now = base.context_length
    factor = rope_scaling.get("factor")
    if factor is None:
        factor = target / now
        if factor <= 1:
            raise ConfigError(f"config: key 'context_length' {target:,} must be longer than the model's context "
                              f"{now:,} ({base.describe()})")
    elif target is not None and target != now * factor:
        raise ConfigError(f"config: 'rope_scaling.factor' {factor:g} x the model's context {now:,} = "
                          f"{now * factor:,.0f}, not 'context_length' {target:,}; give one of them, or both agreeing")
    elif not float(now * factor).is_integer():
        raise ConfigError(f"config: 'rope_scaling.factor' {factor:g} x the model's context {now:,} is not a whole "
                          "number of tokens; give the target as 'context_length' instead")
    new_factor = float(base.factor * factor)
    request_extra = {k: float(rope_scaling[k]) for k in REQUEST_KEYS[rtype] if k in rope_scaling}
    if rtype in ("linear", "dynamic"):
        return Rope(rtype, new_factor, base.theta, base.max_position_embeddings)
    extra = dict(base.extra) if base.type != "default" else dict(LLAMA3_DEFAULTS if rtype == "llama3" else ())
    extra.update(request_extra)
    original = base.original if base.type != "default" else base.max_position_embeddings
    return Rope(rtype, new_factor, base.theta, int(round(now * factor)), original, tuple(sorted(extra.items())))


# ---------------------------------------------------------------------------------------------- writing

def config_keys(rope: Rope) -> dict:
    """The config.json keys that carry `rope`, in every format its readers know:

    rope_theta + rope_scaling   transformers 4.x (and 5.x, which reads rope_scaling first), vLLM, llama.cpp;
                                linear/dynamic as exactly {type, factor} (what transformers 4.40 accepts);
    rope_parameters             transformers 5's own form (theta inside)."""
    params = {"rope_type": rope.type, "rope_theta": rope.theta}
    scaling = None
    if rope.type in ("linear", "dynamic"):
        scaling = {"type": rope.type, "factor": rope.factor}
        params["factor"] = rope.factor
    elif rope.type != "default":
        scaling = {"rope_type": rope.type, "factor": rope.factor,
                   "original_max_position_embeddings": rope.original, **dict(rope.extra)}
        params.update({k: v for k, v in scaling.items() if k != "rope_type"})
    return {"max_position_embeddings": rope.max_position_embeddings, "rope_theta": rope.theta,
            "rope_scaling": scaling, "rope_parameters": params}


def with_rope(config: dict, rope: Rope) -> dict:
    """A copy of a raw config.json dict with its positions set to `rope` (other keys untouched)."""
    out = dict(config)
    out.update(config_keys(rope))
    if out["rope_scaling"] is None:
        out.pop("rope_scaling")
    return out


# ---------------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RopeChange:
    """What a run did to the base's positions: `before` is the base checkpoint's (before any adapter),
    `after` what the run trained with. Recorded in the adapter as `rope`; `zhllama merge` writes `after`."""

    before: Rope
    after: Rope

    def record(self) -> dict:
        return {"from": self.before.to_dict(), "to": self.after.to_dict()}

    @classmethod
    def from_record(cls, rec: dict) -> "RopeChange":
        return cls(Rope.from_dict(rec["from"]), Rope.from_dict(rec["to"]))


def recorded_change(meta: Optional[dict]) -> Optional[RopeChange]:
    """The RoPE change an adapter's zhllama_adapter.json records (None: the run kept the base's positions)."""
    rec = ((meta or {}).get("run_config") or {}).get("rope")
    return RopeChange.from_record(rec) if rec else None


def adapters_change(base_config: dict, adapters, where="config.json") -> Optional[RopeChange]:
    """The positions a chain of adapters (`(path, zhllama_adapter.json dict or None)`, in merge order) needs
    on this base: the last recorded change. Each one recorded must have started from this base's
    positions; an adapter recording none after one that did was trained with the base's (a warning)."""
    if not any(recorded_change(meta) for _, meta in adapters):
        return None                     # nothing changed: the base's config is not even read
    before = read_rope(base_config, where)
    change, source = None, None
    for path, meta in adapters:
        rec = recorded_change(meta)
        if rec is None:
            if change is not None and (meta or {}).get("run_config"):
                log.warning("%s records no RoPE change but follows %s, which extended the context to %s: it was "
                            "trained with the base's positions (%s); the extended ones are kept", path, source,
                            f"{change.after.context_length:,}", before.describe())
            continue
        if rec.before != before:
            raise UserError(f"{path} was trained from a base whose positions were {rec.before.describe()}, but "
                            f"{where} says {before.describe()}: the adapter belongs to another base")
        change, source = rec, path
    return change


def adapter_dirs_change(model_dir, adapter_dirs) -> Optional[RopeChange]:
    """`adapters_change` for adapter directories on disk, on the checkpoint `model_dir`."""
    metas = [(d, read_adapter_dir(Path(d))[2]) for d in adapter_dirs]
    return adapters_change(read_model_config(model_dir), metas, Path(model_dir) / "config.json")


def run_change(base_config: dict, inherited: Optional[RopeChange], rope_scaling, target,
               where="config.json") -> Optional[RopeChange]:
    """The positions a run trains with: the base's, as changed by the earlier stages it merges
    (`inherited`: the last `init_adapters` entry that records one), extended by its own request."""
    before = read_rope(base_config, where)
    if inherited is not None and inherited.before != before:
        raise UserError(f"{where}: an adapter in init_adapters was trained from a base whose positions were "
                        f"{inherited.before.describe()}, this base's are {before.describe()}")
    current = inherited.after if inherited is not None else before
    if rope_scaling is None:
        return inherited
    return RopeChange(before, extend(current, rope_scaling, target))


def for_run(cfg) -> Optional[RopeChange]:
    """The RoPE change of a run config (None: the base's positions), from the base's config.json and the
    records of its `init_adapters`; read before the model is loaded, so a bad request fails first."""
    if cfg.rope_scaling is None and not cfg.init_adapters:
        return None
    where = Path(cfg.model) / "config.json"
    inherited = adapter_dirs_change(cfg.model, cfg.init_adapters)
    change = run_change(read_model_config(cfg.model), inherited, cfg.rope_scaling, cfg.context_length, where)
    block = cfg.preset().block_size
    if change is not None and cfg.rope_scaling is not None and block > change.after.context_length:
        raise ConfigError(f"config: block_size {block:,} is longer than the extended context "
                          f"{change.after.context_length:,} ({change.after.describe()}); raise 'context_length' or "
                          "shorten the blocks")
    return change


def hf_config(model_dir, change: Optional[RopeChange]):
    """The transformers config to load `model_dir` with so that it trains with `change.after` (None: load
    the checkpoint's own). transformers builds its rotary embedding from this config."""
    if change is None:
        return None
    from transformers import AutoConfig   # heavy: only when a run changes the positions

    return AutoConfig.for_model(**with_rope(read_model_config(model_dir), change.after))
