"""The memory a training run will need, estimated from its config and the model's config.json before
anything is allocated, so that `lora_r=100000000` or `micro_batch=65536` is one line naming the key and
the estimate instead of an allocation that takes the machine.

Every figure is a lower bound (a run that fits is never refused; the planner, `zhllama plan`, gives the
full per-GPU picture):
  weights       2 bytes x the parameters (bf16; `zhllama.model_config.estimate_params`)
  LoRA          16 bytes x r x (in + out) of every adapted matrix: fp32 A and B, their gradients, Adam m, v
  embeddings    16 bytes x the trained rows x width, of embed_tokens and lm_head (one matrix when tied);
                the new rows only when the base's are frozen (new_rows_only, embed_lr_base: 0)
  step batch    8 bytes x the tokens of this rank's share of one optimizer step (the engine gathers the
                step's sequences as int64 ids before splitting them into micro batches)
  activations   2 bytes x micro_batch x block_size x layers x width (what gradient checkpointing keeps)
These are compared with the memory this machine has: free RAM and swap, plus one GPU's memory if any.
"""

import os

from zhllama.errors import ConfigError
from zhllama.model_config import Shape, available_memory, dimension, estimate_params, gb
from zhllama.modelio import BASE_VOCAB_KEY

# (in, out) of each LLaMA projection LoRA may adapt, from (hidden, intermediate, q width, kv width).
PROJECTIONS = {
    "q_proj": lambda h, i, q, kv: (h, q), "k_proj": lambda h, i, q, kv: (h, kv),
    "v_proj": lambda h, i, q, kv: (h, kv), "o_proj": lambda h, i, q, kv: (q, h),
    "gate_proj": lambda h, i, q, kv: (h, i), "up_proj": lambda h, i, q, kv: (h, i),
    "down_proj": lambda h, i, q, kv: (i, h),
}


def estimate(cfg, model_cfg: dict, world: int = 1) -> dict:
    """Lower bounds in bytes by part (module docstring) of run config `cfg` on the model `model_cfg`,
    with (part -> the config key that sizes it) under "keys"."""
    p = cfg.preset()
    s = Shape.of(model_cfg)
    lora_width = sum(sum(PROJECTIONS[t](s.hidden, s.intermediate, s.q_width, s.kv_width))
                     for t in (p.lora_targets or ()) if t in PROJECTIONS)
    rows = s.vocab
    if cfg.row_lr_scales()[0] == 0:  # the base's rows frozen: no gradient, no Adam moments (pretrain/row_groups.py)
        rows = max(0, s.vocab - dimension(model_cfg, BASE_VOCAB_KEY, s.vocab))
    matrices = int(p.trains_embeddings) + int(p.trains_lm_head)
    trained_rows = rows * (min(matrices, 1) if s.tied else matrices)
    parts = {
        "weights": 2 * estimate_params(model_cfg),
        "lora": 16 * (p.lora_r or 0) * lora_width * s.layers,
        "embeddings": 16 * trained_rows * s.hidden,
        "step batch": 8 * p.global_batch * p.block_size // max(1, world),
        "activations": 2 * cfg.micro_batch * p.block_size * s.layers * s.hidden,
    }
    parts["keys"] = {"weights": "model", "lora": "lora_r", "embeddings": "model",
                     "step batch": "global_batch", "activations": "micro_batch"}
    return parts


def _gpu_memory() -> int:
    """One visible GPU's memory in bytes, 0 without one (torch is imported only when this is asked)."""
    import torch
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


WHAT = {"weights": "the model's weights (bf16)", "lora": "the LoRA weights, gradients and Adam moments (fp32)",
        "embeddings": "the trained embedding rows with their gradients and Adam moments",
        "step batch": "the token ids of one optimizer step", "activations": "the activations of one micro batch"}


def check_run_fits(cfg, model_cfg: dict, model_config_path) -> None:
    """A ConfigError naming the key behind the largest part when the run's lower bound exceeds the
    memory available (RAM and swap, plus one GPU's memory when the RAM alone is not enough)."""
    parts = estimate(cfg, model_cfg, world=int(os.environ.get("WORLD_SIZE", 1) or 1))
    keys = parts.pop("keys")
    need, have = sum(parts.values()), available_memory()
    if need <= have or need <= have + _gpu_memory():
        return
    part = max(parts, key=parts.get)
    key = keys[part]
    value = cfg.model if key == "model" else getattr(cfg.preset(), key, None) or getattr(cfg, key)
    subject = f"the model {model_config_path}" if key == "model" else f"key '{key}' = {value}"
    raise ConfigError(f"config: {subject} needs ~{gb(parts[part])} for {WHAT[part]}; the run needs at least "
                      f"{gb(need)} in all and {gb(have)} of memory is available")
