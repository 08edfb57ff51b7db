"""What each stage trains, expressed as a PEFT adapter, and the adapter files on disk.

Every stage is a real PEFT adapter, so `final/` of any run loads with `PeftModel.from_pretrained`
and merges with `merge_and_unload`:

* stage2 / sft: `LoraConfig(r, alpha, dropout, target_modules, modules_to_save=[embed_tokens, lm_head])`;
  on a model with tied embeddings, `modules_to_save=[embed_tokens]` and lm_head kept tied to its
  trainable copy (one shared matrix; see "tied embeddings" below).
* stage1: `TrainableTokensConfig(token_indices=...)` on `embed_tokens`: all rows by default, or only
  rows >= `new_rows_from` ("new rows only"). Only the trained rows are parameters, so old rows cannot
  move whatever the optimizer does (weight decay, Adam moments, loss scaling), and optimizer state is
  kept for the trained rows only. A gradient hook that zeroes old rows also keeps them unchanged under
  DeepSpeed ZeRO-2 with AdamW, but only while weight decay is 0 (decoupled decay moves every row) and at
  the price of fp32 master weights and moments for the whole matrix; see docs/plan.md.

`save_adapter` writes the adapter atomically and then re-reads what it wrote: every expected tensor
(LoRA A/B of each targeted module of each layer, embed_tokens/lm_head with the model's vocab rows, the
trained token rows) must be there, with the live model's shape and values, and not all-zero where
training cannot leave zeros. An empty or wrong adapter is an error, never a successful `final/`.
"""

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from zhllama.errors import ConfigError, InputError, UserError
from zhllama.fsutil import atomic_dir, atomic_write_json, sha256_file
from zhllama.hf_tokenizer import TOKENIZER_DIR_FILES
from zhllama.log import get_logger
from zhllama.model_config import TRUST_REMOTE_CODE

from .adapter_files import FORMAT_VERSION, META, WEIGHTS, guess_stage, read_adapter_dir, read_adapter_shapes
from .row_groups import RowSplitEmbedding, join_rows, split_rows

log = get_logger(__name__)

ADAPTER = "default"  # PEFT's adapter name; it is stripped from the keys on disk


# --------------------------------------------------------------------------------------- the stage's PEFT model

def _unwrap(model):
    """The module inside a DeepSpeed engine or DDP wrapper (they keep it in `.module`)."""
    while type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel", "PipelineEngine"):
        model = model.module
    return model


def _module_name(model, module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ConfigError(f"{type(model).__name__} has no module {type(module).__name__}")


@contextlib.contextmanager
def _quiet():
    """Silence transformers 5's deprecation warning raised from inside PEFT on every wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT's note about tied layers: apply_stage/load_adapter keep the tie themselves (_retie).
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        yield


def _peft_config(preset, model, new_rows_from):
    from peft import LoraConfig, TrainableTokensConfig

    vocab = model.get_input_embeddings().weight.shape[0]
    if not preset.uses_lora:
        if not preset.trains_embeddings or preset.trains_lm_head:
            raise ConfigError(f"stage {preset.name}: a stage without LoRA must train embed_tokens only")
        start = 0 if new_rows_from is None else int(new_rows_from)
        if not 0 <= start < vocab:
            raise ConfigError(f"new_rows_from={new_rows_from} must be in [0, {vocab}) for a vocabulary of {vocab} rows")
        embed_name = _module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]
        return TrainableTokensConfig(token_indices=list(range(start, vocab)), target_modules=[embed_name],
                                     task_type="CAUSAL_LM")
    if new_rows_from is not None:
        raise ConfigError(f"new_rows_from (train new embedding rows only) is a stage1 option; {preset.name} trains "
                          "embed_tokens and lm_head in full")
    check_lora_targets(model, preset.lora_targets)
    return LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
                      target_modules=list(preset.lora_targets), modules_to_save=_modules_to_save(preset, model),
                      task_type="CAUSAL_LM")


def check_lora_targets(model, targets) -> None:
    """Each LoRA target must name linear layers of `model` (a meta-device model will do; PEFT's own
    error is a traceback after the weights have loaded)."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"})
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(f"config: key 'lora_targets': {', '.join(repr(t) for t in unknown)} is not a linear "
                          f"layer of this model; available: {', '.join(names)}")


# ------------------------------------------------------------------------------------------- tied embeddings
#
# The rule for a model with `tie_word_embeddings: true` (SmolLM2, LLaMA-3.2 1B/3B): embed_tokens and
# lm_head are one matrix, and they stay one. Stage 2 and SFT train that matrix through embed_tokens only
# (`modules_to_save=["embed_tokens"]`) and point lm_head at the trainable copy, so both ends of the network
# see the same trained weights, the adapter holds one matrix, and merging keeps the model tied. Listing
# both names in modules_to_save (what PEFT does by default) would give lm_head a second, separately trained
# copy and untie the model silently. Stage 1 needs nothing: PEFT's TrainableTokens follows the tie itself.

def is_tied(model) -> bool:
    """True when lm_head's weight is embed_tokens' weight (the same tensor, not just equal values)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None and \
        out.weight is inp.weight


def _modules_to_save(preset, model) -> list:
    names = list(preset.modules_to_save)
    if is_tied(model):
        head = _module_name(model, model.get_output_embeddings()).rsplit(".", 1)[-1]
        names = [n for n in names if n != head]
    return names


def _retie(peft_model, tied: bool) -> None:
    """Point a tied base model's lm_head at the trainable copy of embed_tokens that PEFT made."""
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    emb = base.get_input_embeddings()
    if tied and isinstance(emb, ModulesToSaveWrapper):
        base.get_output_embeddings().weight = emb.modules_to_save[ADAPTER].weight


def apply_stage(model, preset, *, new_rows_from=None, split_rows_at=None, train_base_rows=True):
    """Freeze `model` and wrap it so that exactly what `preset` trains is trainable; returns the PEFT model.

    `model` is a plain transformers causal LM whose embeddings already have the merged vocabulary. An
    earlier stage's adapter must be merged first (`merge_adapters`), so each stage has one adapter.

    `split_rows_at` (the base vocab size `vocab resize` records) makes the rows below it and the rows from it
    two parameters while training (pretrain/row_groups.py), each its own optimizer group;
    `train_base_rows=False` freezes the rows below it (stage 1: TrainableTokens of the new rows only).
    """
    from peft import PeftModel, get_peft_model

    model = _unwrap(model)
    if isinstance(model, PeftModel):
        raise UserError("apply_stage needs a plain model; merge the previous stage's adapter into it first "
                        "(zhllama.pretrain.adapters.merge_adapters)")
    tied = is_tied(model)
    if tied and preset.trains_lm_head:
        log.info("the model ties lm_head to embed_tokens: %s trains the one shared matrix via embed_tokens",
                 preset.name)
    vocab = model.get_input_embeddings().weight.shape[0]
    if split_rows_at is not None and not 0 < int(split_rows_at) <= vocab:
        raise ConfigError(f"the base vocab size {split_rows_at} must be in [1, {vocab}] for a vocabulary of "
                          f"{vocab} rows")
    if not train_base_rows:
        if split_rows_at is None or int(split_rows_at) >= vocab:
            raise ConfigError("freezing the base rows needs a vocabulary with rows beyond the base's "
                              f"(base vocab size {split_rows_at}, {vocab} rows)")
        if not preset.uses_lora:
            new_rows_from = split_rows_at  # stage 1: the base rows are not parameters at all
    model.requires_grad_(False)
    with _quiet():
        peft_model = get_peft_model(model, _peft_config(preset, model, new_rows_from))
    _retie(peft_model, tied)
    peft_model.zhllama_stage = preset.name
    peft_model.zhllama_new_rows_from = new_rows_from
    _check_trainable_set(peft_model, preset)
    peft_model.zhllama_split_rows_at = split_rows_at
    peft_model.zhllama_row_split = None
    if split_rows_at is not None and int(split_rows_at) < vocab:
        peft_model.zhllama_row_split = split_rows(peft_model, int(split_rows_at), train_base=train_base_rows,
                                                  tied=tied)
    return peft_model


_LORA_PARAM = re.compile(r"\.lora_[AB]\.")
_SAVED_PARAM = re.compile(r"\.modules_to_save\.")
_TOKENS_PARAM = re.compile(r"\.trainable_tokens_delta\.")


def _check_trainable_set(model, preset) -> None:
    """Fail loudly if PEFT made anything trainable that the stage does not train, or missed something."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    saved = tuple(getattr(model.peft_config[ADAPTER], "modules_to_save", None) or ())
    if not names:
        raise RuntimeError(f"stage {preset.name}: no trainable parameters after applying the adapter")
    for n in names:
        ok = (_TOKENS_PARAM.search(n) if not preset.uses_lora else
              (_LORA_PARAM.search(n) and n.split(".lora_")[0].rsplit(".", 1)[-1] in preset.lora_targets)
              or (_SAVED_PARAM.search(n) and any(f".{m}.modules_to_save." in n for m in saved)))
        if not ok:
            raise RuntimeError(f"stage {preset.name}: unexpected trainable parameter {n}")


def count_trainable(model):
    """(trainable, total) parameters, each parameter counted once.

    PEFT keeps a frozen copy of every module it trains in full (`modules_to_save`) and of every row it
    trains (`TrainableTokens`), and stage 1's split rows keep the frozen embedding (`row_groups`); those
    copies are the same weights as the trainable ones, so they are not counted again. LoRA matrices are
    new parameters and count in the total. This is the convention of the published figures (LLaMA-7B
    with 49,953 rows: stage1 2.97%, stage2 6.06%, sft 6.22%).
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper

    model = _unwrap(model)
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    shadowed = 0
    for mod in model.modules():
        if isinstance(mod, ModulesToSaveWrapper) or (isinstance(mod, RowSplitEmbedding) and
                                                      mod.original_module is not None):
            shadowed += sum(p.numel() for p in mod.original_module.parameters())
        elif isinstance(mod, TrainableTokensLayer) and mod.tied_adapter is None:
            shadowed += sum(p.numel() for p in mod.trainable_tokens_delta.values())
    return trainable, total - shadowed


# --------------------------------------------------------------------------------------------- expected tensors

def _disk_key(param_name: str) -> str:
    """The key PEFT writes for a live parameter: adapter name and `modules_to_save` segment removed."""
    key = param_name.replace(f".modules_to_save.{ADAPTER}.", ".")
    key = key.replace(f".{ADAPTER}.", ".")
    if key.endswith(f".{ADAPTER}"):
        key = key[: -len(ADAPTER) - 1]
    return key


def _expected_keys(model):
    """Keys the adapter must hold, derived from the base model's structure and the adapter's config
    (not from PEFT's state dict, which is what goes wrong when an adapter comes out empty)."""
    cfg = model.peft_config[ADAPTER]
    base = model.get_base_model()
    prefix = "base_model.model."
    keys = set()
    if str(cfg.peft_type.value) == "TRAINABLE_TOKENS":
        name = _module_name(base, base.get_input_embeddings())
        keys.add(f"{prefix}{name}.trainable_tokens_delta")
        keys.update(_tied_token_keys(model))
        return keys
    targets = set([cfg.target_modules] if isinstance(cfg.target_modules, str) else cfg.target_modules)
    for name, _ in base.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            keys.add(f"{prefix}{name}.lora_A.weight")
            keys.add(f"{prefix}{name}.lora_B.weight")
    for mod in cfg.modules_to_save or ():
        keys.update(f"{prefix}{n}.weight" for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] == mod)
    return keys


def _tied_token_keys(model) -> dict:
    """Stage 1 on a tied model: PEFT also writes the tied lm_head's rows, the same tensor as embed_tokens'
    (disk key -> that parameter)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TrainableTokensLayer) and mod.tied_adapter is not None:
            out[f"{name}.trainable_tokens_delta"] = mod.tied_adapter.trainable_tokens_delta[ADAPTER]
    return out


def _may_be_zero(key: str) -> bool:
    # LoRA B starts at zero by design (the adapter is a no-op before training).
    return ".lora_B." in key


# ------------------------------------------------------------------------------------------------------ saving

def save_adapter(model, out_dir, *, tokenizer_dir=None, run_config=None, base_model=None, overwrite=False,
                 require_trained=False):
    """Write the stage's adapter, the tokenizer and `zhllama_adapter.json` to `out_dir`, atomically.

    Call it on one rank (rank 0). The written files are re-opened and checked against the live model
    before the directory is renamed into place. `require_trained` also rejects an all-zero LoRA B (an
    adapter that was never updated). A model whose vocabulary rows are split for training gets them joined
    back first (`row_groups.join_rows`), so save it when it is done training. Returns the metadata dict.
    """
    import peft

    model = _unwrap(model)
    join_rows(model)  # the split vocabulary rows back into PEFT's own modules: the format on disk is PEFT's
    stage = getattr(model, "zhllama_stage", None)
    if stage is None or not hasattr(model, "peft_config"):
        raise UserError("save_adapter needs a model returned by apply_stage or load_adapter(is_trainable=True)")
    if base_model is None:
        base_model = model.peft_config[ADAPTER].base_model_name_or_path or getattr(
            model.get_base_model().config, "_name_or_path", "") or None
    if base_model is not None:
        model.peft_config[ADAPTER].base_model_name_or_path = str(base_model)
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
        modules = verify_written(model, tmp / WEIGHTS, stage, require_trained=require_trained)
        vocab = int(model.get_base_model().get_input_embeddings().weight.shape[0])
        meta = {
            "format": "zhllama-adapter", "format_version": FORMAT_VERSION,
            "stage": stage, "peft_type": str(model.peft_config[ADAPTER].peft_type.value),
            "base_model": None if base_model is None else str(base_model),
            "vocab_size": vocab,
            "hidden_size": int(model.get_base_model().get_input_embeddings().weight.shape[1]),
            "new_rows_from": getattr(model, "zhllama_new_rows_from", None),
            "modules": modules,
            "tokenizer": [f.name for f in tok_files],
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
            "versions": {"peft": peft.__version__, "torch": torch.__version__.split("+")[0]},
            "run_config": run_config,
        }
        atomic_write_json(tmp / META, meta)
    log.info("saved %s adapter to %s (%s)", stage, out_dir,
             ", ".join(f"{n}: {_mb(m['bytes'])}" for n, m in modules.items()))
    return meta


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _tokenizer_files(tokenizer_dir):
    """The tokenizer files to ship with the adapter: an HF tokenizer dir, or a bare tokenizer.model file."""
    tokenizer_dir = Path(tokenizer_dir)
    if tokenizer_dir.is_file():
        if tokenizer_dir.name != "tokenizer.model":
            raise InputError(tokenizer_dir, "a tokenizer file must be a SentencePiece tokenizer.model")
        return [tokenizer_dir]
    if not tokenizer_dir.is_dir():
        raise InputError(tokenizer_dir, "tokenizer directory not found")
    files = [tokenizer_dir / n for n in TOKENIZER_DIR_FILES if (tokenizer_dir / n).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in files):
        raise InputError(tokenizer_dir, "no tokenizer.model or tokenizer.json in the tokenizer directory")
    return files


def verify_written(model, weights_path, stage, *, require_trained=False):
    """Check the adapter file against the live model; return a summary of the trained modules.

    Raises RuntimeError naming the first problem: a missing, extra, misshapen, changed or all-zero tensor.
    """
    from safetensors import safe_open

    weights_path = Path(weights_path)
    if not weights_path.is_file() or weights_path.stat().st_size == 0:
        raise RuntimeError(f"{weights_path}: adapter weights were not written")
    live = {_disk_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    live.update(_tied_token_keys(model))
    expected = _expected_keys(model)
    if set(live) != expected:
        raise RuntimeError(f"stage {stage}: trainable parameters {sorted(set(live) ^ expected)[:4]} do not match "
                           "the stage's structure")
    with safe_open(str(weights_path), framework="pt") as f:
        on_disk = set(f.keys())
        missing, extra = sorted(expected - on_disk), sorted(on_disk - expected)
        if missing or extra:
            raise RuntimeError(f"{weights_path}: {len(missing)} expected tensor(s) missing (e.g. {missing[:3]}), "
                               f"{len(extra)} unexpected (e.g. {extra[:3]}); {len(on_disk)} tensors on disk")
        modules = {}
        for key in sorted(expected):
            t = f.get_tensor(key)
            want = live[key].detach()
            if tuple(t.shape) != tuple(want.shape):
                raise RuntimeError(f"{weights_path}: {key} has shape {tuple(t.shape)}, the model's is "
                                   f"{tuple(want.shape)}")
            if not torch.equal(t, want.to(device=t.device, dtype=t.dtype)):
                raise RuntimeError(f"{weights_path}: {key} differs from the model's trained values")
            if not bool(t.any()) and (require_trained or not _may_be_zero(key)):
                raise RuntimeError(f"{weights_path}: {key} is all zeros")
            group = _group(key)
            m = modules.setdefault(group, {"tensors": 0, "params": 0, "bytes": 0, "dtype": str(t.dtype)})
            m["tensors"] += 1
            m["params"] += t.numel()
            m["bytes"] += t.numel() * t.element_size()
            if group in ("embed_tokens", "lm_head", "trainable_tokens"):
                m["shape"] = list(t.shape)
    if "trainable_tokens" in modules:
        idx = model.peft_config[ADAPTER].token_indices
        modules["trainable_tokens"]["rows"] = [min(idx), max(idx) + 1]
    if "lora" in modules:
        cfg = model.peft_config[ADAPTER]
        modules["lora"].update(r=cfg.r, alpha=cfg.lora_alpha, targets=sorted(cfg.target_modules))
    return modules


def _group(key: str) -> str:
    if ".lora_" in key:
        return "lora"
    if "trainable_tokens_delta" in key:
        return "trainable_tokens"
    return key.rsplit(".", 2)[-2]  # ...embed_tokens.weight -> embed_tokens


# ----------------------------------------------------------------------------------------------------- loading

def _check_against_base(base_model, cfg, weights, shapes):
    """Every tensor must fit the base module it adapts; a mismatch names both shapes and the file."""
    prefix = "base_model.model."
    modules = dict(base_model.named_modules())
    hint = "the adapter was trained on another base model (resize the base to the adapter's tokenizer first)"
    for key, shape in sorted(shapes.items()):
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".lora_A." in name or ".lora_B." in name:
            mod_name = name.split(".lora_")[0]
            mod = modules.get(mod_name)
            if mod is None or not hasattr(mod, "in_features"):
                raise UserError(f"{weights}: {key} adapts {mod_name}, which the base model does not have; {hint}")
            want_dim = mod.in_features if ".lora_A." in name else mod.out_features
            got_dim = shape[1] if ".lora_A." in name else shape[0]
            if got_dim != want_dim:
                raise UserError(f"{weights}: {key} has shape {shape} but {mod_name} of the base model is "
                                f"{tuple(mod.weight.shape)}; {hint}")
        elif name.endswith(".trainable_tokens_delta"):
            mod_name = name[: -len(".trainable_tokens_delta")]
            mod = modules.get(mod_name)
            if mod is None:
                raise UserError(f"{weights}: {key} adapts {mod_name}, which the base model does not have; {hint}")
            rows, dim = tuple(mod.weight.shape)
            idx = cfg.get("token_indices") or []
            if shape != (len(idx), dim) or (idx and max(idx) >= rows):
                raise UserError(f"{weights}: {key} has shape {shape} for rows {min(idx, default=0)}.."
                                f"{max(idx, default=-1)}, but {mod_name} of the base model is {(rows, dim)}; {hint}")
        else:
            mod_name = name.rsplit(".", 1)[0]
            mod = modules.get(mod_name)
            if mod is None or not hasattr(mod, "weight"):
                raise UserError(f"{weights}: {key} replaces {mod_name}, which the base model does not have; {hint}")
            if tuple(mod.weight.shape) != shape:
                raise UserError(f"{weights}: {key} has shape {shape} but {mod_name} of the base model is "
                                f"{tuple(mod.weight.shape)}; {hint}")


def load_adapter(base_model, adapter_dir, is_trainable=False):
    """Apply the adapter in `adapter_dir` to `base_model` (a plain transformers model); returns the PEFT model.

    The files are checked first (present, non-empty, complete, matching the sha256 recorded at save time)
    and every tensor is checked against the base module it adapts, so a wrong base is a clear error rather
    than a size-mismatch traceback from deep inside PEFT.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    base_model = _unwrap(base_model)
    if isinstance(base_model, PeftModel):
        raise UserError("load_adapter needs a plain base model; merge the adapter already applied first")
    cfg, weights, meta = read_adapter_dir(adapter_dir)
    shapes = read_adapter_shapes(weights)
    _check_against_base(base_model, cfg, weights, shapes)
    tied = is_tied(base_model)
    if tied and any(k.endswith(".lm_head.weight") for k in shapes):
        raise UserError(f"{weights}: the adapter holds its own lm_head but the base model ties lm_head to "
                        "embed_tokens; zhllama trains a tied model's shared matrix via embed_tokens only")
    with _quiet():
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable,
                                          trust_remote_code=TRUST_REMOTE_CODE)
    _retie(model, tied)
    model.zhllama_stage = (meta or {}).get("stage") or guess_stage(cfg)
    model.zhllama_new_rows_from = (meta or {}).get("new_rows_from")
    return model


def merge_adapters(base_model, adapter_dirs):
    """Apply each adapter in order and fold it into the weights; returns a plain transformers model.

    The SFT stage starts from base + stage-2 adapter merged this way; `zhllama merge` does the same.
    """
    model = _unwrap(base_model)
    for d in adapter_dirs:
        model = load_adapter(model, d).merge_and_unload()
        log.info("merged adapter %s", d)
    return model
