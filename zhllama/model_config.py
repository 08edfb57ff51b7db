"""What a model, tokenizer or adapter directory may ask of us, checked before anything is loaded.

Two kinds of hostile or broken directory are stopped here, in the one place every loader goes through
(`modelio.read_model_config`, `modelio.load_tokenizer`, the planner, the adapter reader):

* Code. transformers imports Python shipped inside a checkpoint when a config names it (`auto_map`),
  and when `trust_remote_code` is not given it asks "run the custom code? [y/N]" on stdin, which
  `zhllama generate` reads prompts from. Every zhllama call passes `TRUST_REMOTE_CODE` (False) and a
  directory whose config, tokenizer config or adapter config names code, or a class transformers does
  not ship, is refused up front with one line naming the file and the key.
* Size. A config.json is a recipe for allocations: layers x width x vocabulary. Every dimension must be
  a positive integer no real model exceeds (`DIMENSIONS`), and a loader that materialises weights first
  checks that the weights it implies fit in the memory this machine has (`check_weights_fit`). The
  message carries the estimate. A model built on the meta device (shape checks, the planner) allocates
  nothing but Python objects per layer, so the dimension limits are what bound it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from zhllama.bpe import load_tokenizer as load_tokenizer_json
from zhllama.errors import InputError, UserError

TRUST_REMOTE_CODE = False  # passed explicitly to every transformers/PEFT loader: never prompt, never import
# Files transformers or PEFT read from a model, tokenizer or adapter dir that can name code to import.
CODE_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json", "processor_config.json",
              "preprocessor_config.json")
MAX_CONFIG_BYTES = 64 << 20   # a config JSON (tokenizer configs of old checkpoints hold added tokens: MBs)
LEGACY_TOKENIZER_CLASSES = ("LLaMATokenizer",)  # decapoda-era name modelio repairs (modelio.load_tokenizer)

# key -> the largest value accepted: far beyond any published model (405B: 126 layers, width 16384,
# MLP 53248, vocab 128256; the largest vocabularies are about 262k, the longest contexts 10M tokens).
DIMENSIONS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 24,
}


def gb(nbytes: float) -> str:
    """Bytes as GB for a message: 3 significant digits, any magnitude."""
    return f"{nbytes / 1e9:.3g} GB"


def available_memory() -> int:
    """Bytes this process could still allocate: free RAM (page cache included) plus free swap."""
    return int(psutil.virtual_memory().available + psutil.swap_memory().free)


def read_config_json(path) -> dict:
    """A config JSON object (at most MAX_CONFIG_BYTES), or an InputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(path, f"{size:,} bytes is too large for a config file (at most {MAX_CONFIG_BYTES:,})")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError
        raise InputError(path, f"not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"not a JSON object (found {type(data).__name__}): a config maps keys to values")
    return data


# ----------------------------------------------------------------------------------------------- code

# Names transformers ships that zhllama's own files and the LLaMA family use: answered without importing
# transformers (about 2 s), so a refusal for another reason comes at once. Any other name is looked up
# in transformers' own tables.
COMMON_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma"})
COMMON_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizer",
                                      "LlamaTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast"})


def _known_model_type(name: str) -> bool:
    if name in COMMON_MODEL_TYPES:
        return True
    from transformers import CONFIG_MAPPING
    return name in CONFIG_MAPPING


def _known_tokenizer_class(name: str) -> bool:
    if name in COMMON_TOKENIZER_CLASSES or name in LEGACY_TOKENIZER_CLASSES:
        return True
    import transformers
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    return hasattr(transformers, name) or tokenizer_class_from_name(name) is not None


def refuse_code_keys(data: dict, path, *, classes: bool = True, kind: str = "") -> None:
    """A one-line InputError when the config `data` read from `path` names code transformers or PEFT
    would import: `auto_map` anywhere, a PEFT `auto_mapping` outside transformers, and (with `classes`,
    which imports transformers) the `model_type` of a model config or the `tokenizer_class` of a tokenizer
    config (`kind` "model" / "tokenizer"; by default from the file name) that transformers does not ship."""
    path = Path(path)
    kind = kind or {"config.json": "model", "tokenizer_config.json": "tokenizer"}.get(path.name, "")
    if "auto_map" in data:
        found = data["auto_map"]
        values = list(found.values()) if isinstance(found, dict) else [found]
        names = sorted({str(x) for v in values for x in (v if isinstance(v, list) else [v]) if x is not None})
        raise InputError(path, f"key 'auto_map' names code shipped with the files ({', '.join(names)[:200]}); "
                               "zhllama never runs code from a model directory: use a model whose classes "
                               "transformers ships (remove the key and the .py files)")
    mapping = data.get("auto_mapping")
    if mapping is not None:
        library = mapping.get("parent_library") if isinstance(mapping, dict) else mapping
        if not (isinstance(library, str) and (library == "transformers" or library.startswith("transformers."))):
            raise InputError(path, f"key 'auto_mapping' names a base model class from {library!r}, which would be "
                                   "imported; zhllama loads adapters only onto transformers models")
    if not classes:
        return
    model_type = data.get("model_type")
    if kind == "model" and model_type is not None and not (
            isinstance(model_type, str) and _known_model_type(model_type)):
        raise InputError(path, f"key 'model_type' is {model_type!r}, a model transformers does not ship "
                               "(zhllama never runs code from a model directory)")
    cls = data.get("tokenizer_class")
    if kind == "tokenizer" and cls is not None and not (
            isinstance(cls, str) and _known_tokenizer_class(cls)):
        raise InputError(path, f"key 'tokenizer_class' is {cls!r}, a class transformers does not ship "
                               "(zhllama never runs code from a model directory)")


def check_no_remote_code(directory, *, classes: bool = True) -> None:
    """Refuse a model, tokenizer or adapter directory any of whose CODE_FILES names code (see
    `refuse_code_keys`); a file path (a bare tokenizer.model) has none."""
    d = Path(directory)
    if not d.is_dir():
        return
    for name in CODE_FILES:
        f = d / name
        if f.is_file():
            refuse_code_keys(read_config_json(f), f, classes=classes)


def check_tokenizer_dir(path) -> None:
    """What can be checked of a tokenizer directory without building the tokenizer, so a command can
    refuse it before starting work: it names no code (`check_no_remote_code`) and its tokenizer.json,
    if any, is one the tokenizers library reads. A file path (a bare .model) passes."""
    p = Path(path)
    if p.is_dir():
        check_no_remote_code(p)
        if (p / "tokenizer.json").is_file():
            load_tokenizer_json(p)  # a tokenizer.json the tokenizers library cannot read: one line naming it


# ----------------------------------------------------------------------------------------------- size

def dimension(cfg: dict, key: str, default: int = 0) -> int:
    """`cfg[key]` when it is a positive integer, else `default` (for lower-bound estimates)."""
    v = cfg.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


@dataclass(frozen=True)
class Shape:
    """The dimensions of a LLaMA-style config.json that size its weights; a missing one is 0 (a missing
    head count one full-width head), so what is computed from them is a lower bound."""
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    q_width: int    # attention heads x head_dim
    kv_width: int   # key/value heads x head_dim
    tied: bool

    @classmethod
    def of(cls, cfg: dict) -> "Shape":
        h, heads = dimension(cfg, "hidden_size"), dimension(cfg, "num_attention_heads", 1)
        head_dim = dimension(cfg, "head_dim", h // heads)
        return cls(hidden=h, layers=dimension(cfg, "num_hidden_layers"), vocab=dimension(cfg, "vocab_size"),
                   intermediate=dimension(cfg, "intermediate_size"), q_width=heads * head_dim,
                   kv_width=dimension(cfg, "num_key_value_heads", heads) * head_dim,
                   tied=bool(cfg.get("tie_word_embeddings", True)))


def estimate_params(cfg: dict) -> int:
    """A lower bound on the parameters of the LLaMA-style model `cfg` describes (`Shape`): embeddings (and
    an untied lm_head), and per layer the attention projections, the gated MLP and two norms."""
    s = Shape.of(cfg)
    attention = 2 * s.hidden * s.q_width + 2 * s.hidden * s.kv_width  # q, o; k, v
    per_layer = attention + 3 * s.hidden * s.intermediate + 2 * s.hidden
    head = 0 if s.tied else s.vocab * s.hidden
    return s.vocab * s.hidden + head + s.layers * per_layer + s.hidden


def _weights_note(cfg: dict) -> str:
    n = estimate_params(cfg)
    return (f" (the model it describes has at least {n:.3g} parameters, {gb(4 * n)} in float32; "
            f"{gb(available_memory())} of memory is available)") if n else ""


def check_model_config(cfg, path, *, context_given: bool = False) -> dict:
    """`cfg`, the JSON read from the model config `path`, if it names no code and every dimension in
    DIMENSIONS is a positive integer within its limit (heads dividing the width, key/value heads dividing
    the heads); else one InputError naming the file and the key, with the size the values imply.
    `context_given`: the caller checks max_position_embeddings itself (`zhllama serve`, which bounds
    every prompt by it and takes --max-context when it is no context length), so it is skipped here; a
    position table it would size is still checked against the weights' shapes (modelio.check_checkpoint)."""
    path = Path(path)
    if not isinstance(cfg, dict):
        raise InputError(path, f"not a JSON object (found {type(cfg).__name__}): a config maps keys to values")
    refuse_code_keys(cfg, path, kind="model")
    for key, most in DIMENSIONS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if value is None and key in ("head_dim", "num_key_value_heads"):
            continue  # null: transformers derives it
        if key == "max_position_embeddings" and context_given:
            continue
        too_large = isinstance(value, int) and not isinstance(value, bool) and value > most
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            note = _weights_note(cfg) if too_large else ""
            raise InputError(path, f"key '{key}' must be an integer in 1..{most:,}, got {value!r}{note}")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and cfg.get("hidden_size") and cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise InputError(path, f"key 'num_attention_heads' ({heads}) must divide hidden_size ({cfg['hidden_size']}) "
                               "when head_dim is not given")
    if heads and kv and heads % kv:
        raise InputError(path, f"key 'num_key_value_heads' ({kv}) must divide num_attention_heads ({heads})")
    return cfg


def check_weights_fit(cfg: dict, path, bytes_per_param: int, dtype_name: str) -> None:
    """Refuse, before any allocation, a model whose weights at `bytes_per_param` cannot fit in the memory
    this machine has left; the message gives both figures."""
    n = estimate_params(cfg)
    need, have = n * bytes_per_param, available_memory()
    if need > have:
        raise UserError(f"{path}: the model it describes needs at least {gb(need)} for its {n:.3g} weights in "
                        f"{dtype_name}, but {gb(have)} of memory is available")
