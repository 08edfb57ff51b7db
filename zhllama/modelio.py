"""Model and tokenizer I/O shared by every stage.

One place decides how a checkpoint directory becomes a model and a tokenizer, so every stage agrees
on the quirks of LLaMA checkpoints in the wild:

* tokenizers come as an HF dir (`tokenizer.json` preferred), or only a SentencePiece
  `tokenizer.model` (a dir holding one, or the file itself);
* early LLaMA conversions (decapoda) name the class `LLaMATokenizer` and give bos/eos ids 0/1;
  we repair both with a warning instead of failing or silently training with wrong special ids;
* a tokenizer and a model whose vocabularies disagree fail early, with a message saying what to run,
  rather than with an index error deep inside the embedding;
* models are always loaded from local files (never the hub) and written atomically.

Padded vocabularies: `zhllama vocab resize --pad-to-multiple-of` leaves rows past the tokenizer's
size; the config then says `"zhllama_tokenizer_vocab_size": N` and those rows are never produced by
the tokenizer, so a model with more rows than the tokenizer is accepted only when that key matches.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import spm as _spm
from .dtypes import TORCH_NAMES, torch_dtype
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_json
from .hf_tokenizer import hf_tokenizer_from_proto, make_portable
from .log import get_logger
from .model_config import (TRUST_REMOTE_CODE, check_model_config, check_no_remote_code, check_tokenizer_dir,
                           check_weights_fit, read_config_json)
from .spm import SP_MODEL_NAME, sp_model_path
from .st_stream import read_header

log = get_logger(__name__)

# Config key written by `vocab resize --pad-to-multiple-of`: the tokenizer's size; rows past it pad.
PADDED_VOCAB_KEY = "zhllama_tokenizer_vocab_size"


def _transformers_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}") from e


def _sp_special_pieces(sp_file: Path) -> dict:
    """unk/bos/eos piece strings as the SentencePiece model defines them."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    out = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        if 0 <= idx < sp.get_piece_size():
            out[name] = sp.id_to_piece(idx)
    return out


def _llama_tokenizer_from_sp(sp_file: Path, **kwargs):
    """An HF (tokenizers-backed) tokenizer for a SentencePiece model file: exact for BPE models,
    transformers' LLaMA conversion for other model types.

    The file is exposed as `tokenizer.model` in a temporary dir because that is the one loading path
    that works on both transformers 4.4x and 5.x.
    """
    proto = _spm.load_proto(sp_file)  # InputError naming the file if it is not a SentencePiece model
    if proto.trainer_spec.model_type == _spm.BPE and not kwargs:
        # Built like sentencepiece itself (zhllama.hf_tokenizer): transformers 5's own conversion of
        # LLaMA's model disagrees with sentencepiece on runs of spaces and leading spaces.
        tok = hf_tokenizer_from_proto(proto)
        tok.init_kwargs["zhllama_sp_model"] = str(sp_file.resolve())
        return tok

    from transformers import LlamaTokenizerFast

    kwargs = {**_sp_special_pieces(sp_file), "add_bos_token": True, "add_eos_token": False, **kwargs}
    with tempfile.TemporaryDirectory(prefix="zhllama-tok-") as tmp:
        link = Path(tmp) / SP_MODEL_NAME
        try:
            os.symlink(sp_file.resolve(), link)
        except OSError:
            shutil.copyfile(sp_file, link)
        try:
            tok = LlamaTokenizerFast.from_pretrained(tmp, local_files_only=True,
                                                     trust_remote_code=TRUST_REMOTE_CODE, **kwargs)
        except Exception as e:  # a corrupt .model surfaces as various library errors
            raise UserError(f"{sp_file}: cannot load as a SentencePiece tokenizer: {e}") from e
    # Loaded from a temp dir: remember the real file so save_pretrained_atomic can copy it along.
    tok.init_kwargs["zhllama_sp_model"] = str(sp_file.resolve())
    return tok


def load_tokenizer(path):
    """An HF tokenizer from an HF dir, or from a SentencePiece `tokenizer.model` (dir or file).

    `tokenizer.json` is preferred when present (it is what the merge writes and what users ship).
    A decapoda-era `LLaMATokenizer` config is repaired: the real LLaMA class, with unk/bos/eos taken
    from the SentencePiece model instead of the empty strings those configs carry. A directory that names
    code (`auto_map`, a class transformers does not ship) is refused before transformers sees it.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such tokenizer file or directory")
    if p.is_file():
        if p.suffix == ".json":
            raise UserError(f"{p}: pass the tokenizer directory, not one of its JSON files")
        return _llama_tokenizer_from_sp(p)

    check_tokenizer_dir(p)
    cfg_file = p / "tokenizer_config.json"
    cfg = read_config_json(cfg_file) if cfg_file.is_file() else {}
    if cfg.get("tokenizer_class") == "LLaMATokenizer":
        log.warning("%s: tokenizer_class 'LLaMATokenizer' is from an early LLaMA conversion; "
                    "loading it as LlamaTokenizer with special tokens from %s", cfg_file, SP_MODEL_NAME)
        return _llama_tokenizer_from_sp(sp_model_path(p))
    if (p / "tokenizer.json").is_file() or cfg_file.is_file():
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=TRUST_REMOTE_CODE)
        except Exception as e:  # transformers raises KeyError, TypeError, AttributeError... on odd files
            raise UserError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
        if (p / SP_MODEL_NAME).is_file():
            tok.init_kwargs.setdefault("zhllama_sp_model", str((p / SP_MODEL_NAME).resolve()))
        return tok
    if (p / SP_MODEL_NAME).is_file():
        return _llama_tokenizer_from_sp(p / SP_MODEL_NAME)
    raise UserError(f"{p}: not a tokenizer directory (no tokenizer.json, tokenizer_config.json "
                    f"or {SP_MODEL_NAME})")


def tokenizer_size(path) -> int:
    """len(tokenizer) including added tokens; a bare SentencePiece model is read without converting."""
    p = Path(path)
    if p.is_file() and p.suffix != ".json":
        import sentencepiece as spm
        try:
            return spm.SentencePieceProcessor(model_file=str(p)).get_piece_size()
        except Exception as e:
            raise UserError(f"{p}: cannot load as a SentencePiece model: {e}") from e
    return len(load_tokenizer(p))


def read_model_config(path, *, context_given: bool = False) -> dict:
    """The raw `config.json` of a checkpoint dir (no weights read), checked before anything is built
    from it: no code named anywhere in the directory, every dimension in range (`zhllama.model_config`;
    `context_given`: see check_model_config)."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"{p}: not a model checkpoint directory (no config.json)")
    check_no_remote_code(p)
    return check_model_config(read_config_json(cfg), cfg, context_given=context_given)


def check_vocab_match(model_path, tokenizer_path, model_config=None, tok_size=None) -> None:
    """Fail with what to run when the model's embedding rows do not fit the tokenizer."""
    cfg = model_config if model_config is not None else read_model_config(model_path)
    rows = cfg.get("vocab_size")
    if rows is None:
        raise UserError(f"{model_path}/config.json: missing key 'vocab_size'")
    n = tok_size if tok_size is not None else tokenizer_size(tokenizer_path)
    if rows == n:
        return
    padded_to = cfg.get(PADDED_VOCAB_KEY)
    if rows > n and padded_to == n:
        return  # rows n..rows-1 are padding the tokenizer never produces
    raise UserError(
        f"vocabulary mismatch: tokenizer {tokenizer_path} has {n} tokens but model {model_path} has "
        f"{rows} embedding rows; run `zhllama vocab resize --model {model_path} "
        f"--tokenizer {tokenizer_path} --out DIR` first")


# ----------------------------------------------------------------------------- checkpoint files
# Checked from the headers alone, before transformers reads a byte of weights: a truncated copy, a
# flipped header byte or a tensor of the wrong shape is one line naming the shard, not a library
# traceback (or, worse for a wrong shape, a silently re-initialised tensor).

def checkpoint_shards(model_dir) -> list:
    """The safetensors files of a checkpoint dir, in index order (every listed shard must exist). A
    checkpoint with only pickled pytorch_model*.bin weights is refused: loading a pickle can run code."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = _read_json(index)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (need a key 'weight_map' of name -> file)") from None
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise UserError(f"{index}: shard {missing[0]} is listed but not found in {d}")
        return [d / f for f in files]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if list(d.glob("pytorch_model*.bin")):
        raise UserError(f"{d}: only pickled pytorch_model*.bin weights, which zhllama does not load (unpickling "
                        "can run code); convert them to safetensors where you trust the files (transformers: "
                        "from_pretrained, then save_pretrained) and pass that directory")
    raise UserError(f"{d}: no weights (no model.safetensors, model.safetensors.index.json or "
                    "pytorch_model*.bin)")


def safetensors_header(path) -> dict:
    """name -> (dtype, shape) of a safetensors file, after checking that the header parses and that the
    tensors' bytes tile the file (`st_stream.read_header`: a truncated copy or overlapping offsets fail
    here, not mid-load)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: safetensors file is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            entries, _, _ = read_header(f, size)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in entries.items()}


def meta_model(model_dir, *, context_given: bool = False):
    """The model a checkpoint's `config.json` describes, on the meta device (no memory, no weights):
    for checking shapes and module names before anything is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    read_model_config(model_dir, context_given=context_given)  # missing, unreadable, naming code or out of range
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=TRUST_REMOTE_CODE)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=TRUST_REMOTE_CODE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{Path(model_dir) / 'config.json'}: cannot build the model it describes: {e}") from None


def check_checkpoint(model_dir, *, context_given: bool = False) -> None:
    """Refuse a checkpoint whose weight files are unreadable, whose tensors do not have the shapes its
    config.json implies, or that lacks a tensor the config implies (transformers would fill it with random
    values: a config of 1000 layers over shards of 2), naming the shard and tensor; reads headers only."""
    d = Path(model_dir)
    model = meta_model(d, context_given=context_given)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    found = set()
    for shard in checkpoint_shards(d):
        for name, (_, shape) in safetensors_header(shard).items():
            want = expected.get(name)
            if want is not None and tuple(want) != shape:
                raise UserError(f"{shard}: tensor '{name}' has shape {list(shape)} but {d / 'config.json'} "
                                f"implies {list(want)}")
            found.add(name)
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 1:,} more" if len(missing) > 1 else ""
        raise UserError(f"{d}: no tensor '{missing[0]}'{more} in the weights, but {d / 'config.json'} implies "
                        f"{len(expected):,} tensors (a config that does not belong to these weights?)")


def check_device(device: str) -> str:
    """A usable torch device string, or a one-line error (no traceback for a GPU-less --device cuda)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a device (examples: cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif dev.type != "cpu" and dev.type != "mps":
        raise UserError(f"--device {device}: unsupported device type '{dev.type}' (cpu or cuda)")
    return device


def _fix_special_ids(model, tokenizer) -> None:
    """Repair decapoda-style bos/eos ids (0/1 where the tokenizer says 1/2) in the model's configs."""
    for name in ("bos_token_id", "eos_token_id"):
        want = getattr(tokenizer, name, None)
        if want is None:
            continue
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is None:
                continue
            have = getattr(cfg, name, None)
            if have is not None and have != want and not isinstance(have, list):
                log.warning("%s: %s is %s but the tokenizer says %s; using the tokenizer's",
                            type(cfg).__name__, name, have, want)
                setattr(cfg, name, want)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None and pad < 0:  # decapoda: pad_token_id -1
        model.config.pad_token_id = None
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = None


def load_model(path, dtype=None, device="cpu", tokenizer_path=None, config=None, *, context_given: bool = False):
    """`AutoModelForCausalLM` from a local HF dir (never the hub), SDPA attention.

    With `tokenizer_path`, the tokenizer/vocab sizes are checked before any weight is read and the
    model's bos/eos ids are aligned with the tokenizer's. `config` (a transformers config) replaces the
    checkpoint's config.json: a run that extends the context loads its weights with other RoPE settings.
    `context_given`: see check_model_config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    p = Path(path)
    cfg = read_model_config(p, context_given=context_given)
    check_weights_fit(cfg, p / "config.json", dtype.itemsize, str(dtype).replace("torch.", ""))
    tok = None
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        check_vocab_match(p, tokenizer_path, cfg, len(tok))
    check_checkpoint(p, context_given=context_given)
    dtype_kw = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
    if config is not None:
        dtype_kw["config"] = config
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), local_files_only=True, attn_implementation="sdpa", trust_remote_code=TRUST_REMOTE_CODE,
            use_safetensors=True, **dtype_kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot load the model: {e}") from e
    if tok is not None:
        _fix_special_ids(model, tok)
    return model.to(device)


def save_tokenizer(tokenizer_dir_or_obj, out_dir) -> None:
    """Write an HF tokenizer into `out_dir`, with its SentencePiece `tokenizer.model` when known.

    transformers 5 no longer writes `tokenizer.model`; later stages (merge reports, subword-mean
    init) need it, so it is copied from where the tokenizer came from.
    """
    out_dir = Path(out_dir)
    tok = tokenizer_dir_or_obj
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    tok.save_pretrained(str(out_dir))
    sp_file = tok.init_kwargs.get("zhllama_sp_model") or getattr(tok, "vocab_file", None)
    if sp_file and Path(sp_file).is_file() and not (out_dir / SP_MODEL_NAME).exists():
        shutil.copyfile(sp_file, out_dir / SP_MODEL_NAME)
    # The private key must not leak into the written config.
    cfg_file = out_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = _read_json(cfg_file)
        if cfg.pop("zhllama_sp_model", None) is not None:
            cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # A class name transformers 4.x knows too (5.x writes "TokenizersBackend").
    make_portable(out_dir)


def save_pretrained_atomic(model, tokenizer_dir_or_obj, out_dir, overwrite=False) -> Path:
    """Write a complete HF checkpoint (safetensors, config, generation config, tokenizer) atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))  # safetensors is the default (4.4x and 5.x)
        if tokenizer_dir_or_obj is not None:
            save_tokenizer(tokenizer_dir_or_obj, tmp)
    return out_dir


def load_for_inference(model_dir, tokenizer_path=None, device="auto", dtype="auto", config=None, *,
                       context_given: bool = False):
    """(model in eval mode, tokenizer) for generate / eval / serve.

    device "auto": CUDA when present, else CPU; dtype "auto": bf16 on GPUs that have it, fp16 on other
    GPUs, fp32 on CPU. The tokenizer (default: the model's own) is checked against the model's vocab.
    `config` replaces the checkpoint's config.json (see `load_model`); `context_given`: the caller bounds
    the context (see check_model_config).
    """
    read_model_config(model_dir, context_given=context_given)  # code, dimensions: refused before torch or a tokenizer
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.startswith("cuda") \
            else "float32"
    if dtype not in TORCH_NAMES:
        raise UserError(f"--dtype {dtype}: expected auto, float32, float16 or bfloat16")
    tok_path = tokenizer_path or model_dir
    tokenizer = load_tokenizer(tok_path)
    model = load_model(model_dir, dtype=torch_dtype(dtype), device=device, tokenizer_path=tok_path,
                       config=config, context_given=context_given).eval()
    return model, tokenizer


BASE_VOCAB_KEY = "zhllama_base_vocab_size"  # rows of the original (pre-merge) vocabulary, set by resize


def write_resized_configs(out_dir, base_config: dict, base_dir, *, rows: int, tokenizer_size: int, tokenizer,
                          dtype_name=None, base_vocab_size=None) -> dict:
    """`config.json` and `generation_config.json` for a checkpoint whose embeddings now have `rows` rows.

    Shared by `vocab resize` and `merge`: vocab_size = rows; rows beyond the tokenizer are marked as
    padding (PADDED_VOCAB_KEY); bos/eos follow the tokenizer (decapoda configs had 0/1 wrong); a pad id
    outside the vocabulary (decapoda's -1) is dropped. `base_vocab_size` (resize) records where the
    added rows start, for stage 1's new-rows-only training; a model resized twice keeps the first.
    Returns the new config.
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    new_cfg = dict(base_config, vocab_size=rows)
    new_cfg.pop(PADDED_VOCAB_KEY, None)
    if tokenizer_size < rows:
        new_cfg[PADDED_VOCAB_KEY] = tokenizer_size
    if base_vocab_size is not None:
        new_cfg[BASE_VOCAB_KEY] = int(base_config.get(BASE_VOCAB_KEY, base_vocab_size))
    if dtype_name:
        for key in [k for k in ("dtype", "torch_dtype") if k in base_config] or ["torch_dtype"]:
            new_cfg[key] = dtype_name
    for key in ("bos_token_id", "eos_token_id"):
        want = getattr(tokenizer, key, None)
        if want is not None and new_cfg.get(key) != want:
            log.warning("config.json %s %s -> %s (the tokenizer's)", key, new_cfg.get(key), want)
            new_cfg[key] = want
    if new_cfg.get("pad_token_id") is not None and not 0 <= int(new_cfg["pad_token_id"]) < rows:
        new_cfg["pad_token_id"] = None
    atomic_write_json(out_dir / "config.json", new_cfg)
    gen_file = base_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if new_cfg.get(key) is not None:
            gen[key] = new_cfg[key]
        else:
            gen.pop(key, None)
    atomic_write_json(out_dir / "generation_config.json", gen)
    return new_cfg
