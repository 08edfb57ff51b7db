"""The adapter directory on disk, read without torch: the files `save_adapter` writes and their checks.

Kept apart from adapters.py (which builds and trains adapters, and imports torch and PEFT) so that
`zhllama merge`, which streams adapters as files, reads them through the same checks without loading a
model. See docs/architecture.md.
"""

from pathlib import Path

from zhllama.errors import InputError
from zhllama.fsutil import read_json, sha256_file
from zhllama.model_config import refuse_code_keys

WEIGHTS = "adapter_model.safetensors"
META = "zhllama_adapter.json"
FORMAT_VERSION = 1


def read_adapter_dir(adapter_dir: Path):
    """(adapter_config, weights path, zhllama meta or None), with a UserError for anything unusable."""
    if not adapter_dir.is_dir():
        raise InputError(adapter_dir, "adapter directory not found")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise InputError(adapter_dir, "not a PEFT adapter: adapter_config.json is missing")
    cfg = read_json(cfg_path, required=("peft_type",))
    refuse_code_keys(cfg, cfg_path)  # auto_map / a base class outside transformers: code PEFT could import
    weights = adapter_dir / WEIGHTS
    if not weights.is_file():
        legacy = adapter_dir / "adapter_model.bin"
        raise InputError(weights, "adapter weights are missing" + (
            " (only a legacy adapter_model.bin is present; re-save it as safetensors)" if legacy.exists() else ""))
    size = weights.stat().st_size
    if size == 0:
        raise InputError(weights, "empty file (0 bytes): the adapter was not written")
    meta = None
    meta_path = adapter_dir / META
    if meta_path.is_file():
        meta = check_meta(read_json(meta_path), meta_path)
        want = (meta.get("files") or {}).get(WEIGHTS)
        if want and want.get("bytes") != size:
            raise InputError(weights, f"truncated or replaced: {size:,} bytes, {META} records {want['bytes']:,}")
        if want and sha256_file(weights) != want.get("sha256"):
            raise InputError(weights, f"corrupt: sha256 differs from the one recorded in {META}")
    return cfg, weights, meta


# The fields of zhllama_adapter.json that readers use, and the JSON types each may hold (or null).
META_TYPES = {"stage": str, "base_model": str, "vocab_size": int, "hidden_size": int, "new_rows_from": int,
              "files": dict, "modules": dict, "tokenizer": list, "run_config": dict}
RUN_CONFIG_TYPES = {"init_adapters": list, "template": str, "template_spec": dict}


def check_meta(meta, path: Path) -> dict:
    """`meta` read from a zhllama_adapter.json if it is an object whose used fields have their types
    (`META_TYPES`; `files` maps names to objects); else an InputError naming the file and the key."""
    if not isinstance(meta, dict):
        raise InputError(path, f"not a JSON object (found {type(meta).__name__}); re-save the adapter")
    for table, where in ((META_TYPES, meta), (RUN_CONFIG_TYPES, meta.get("run_config") or {})):
        for key, kind in table.items():
            value = where.get(key)
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise InputError(path, f"key '{key}' must be a JSON {kind.__name__} or null, got {value!r:.80}")
    for name, entry in (meta.get("files") or {}).items():
        if not isinstance(entry, dict):
            raise InputError(path, f"key 'files': entry '{name}' must be an object with bytes and sha256")
    return meta


def read_adapter_shapes(weights: Path):
    """{key: shape} of an adapter's safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or short file
        raise InputError(weights, f"unreadable or truncated safetensors file ({e})") from None
    if not shapes:
        raise InputError(weights, "the adapter holds no tensors (an empty adapter; was it saved from a DeepSpeed "
                                  "engine without gathering its weights?)")
    return shapes


def guess_stage(cfg) -> str:
    """The stage an adapter came from, by its PEFT config, for adapters saved without zhllama's meta file."""
    if cfg.get("peft_type") == "TRAINABLE_TOKENS":
        return "stage1"
    targets = set(cfg.get("target_modules") or [])
    return "sft" if "gate_proj" in targets else "stage2"
