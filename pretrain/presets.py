"""Stage presets: what each training stage trains and with which hyperparameters (docs/training.md, Stage presets).

One frozen dataclass per stage, so the trainer, the planner and the adapter code read the same numbers
instead of keeping copies. Figures follow Chinese-LLaMA-Alpaca (v1) for LLaMA-7B:

| stage  | trains                                  | LoRA (r, alpha, dropout, targets)   | lr   | global x len |
| stage1 | embed_tokens only (option: new rows)    | none                                | 2e-4 | 1024 x 512   |
| stage2 | LoRA + embed_tokens + lm_head           | 8, 32, 0.05, q k v o                | 1e-4 | 1024 x 512   |
| sft    | LoRA + embed_tokens + lm_head           | 8, 32, 0.05, q k v o gate up down   | 1e-4 |  512 x 512   |

All stages: 5% linear warmup then cosine decay; AdamW (0.9, 0.95), weight decay 0; gradient clipping 1.0.
"""

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from zhllama.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# The preset fields a run config may override (`lr=5e-5`, `lora_r=16`; null: the preset's value). The one
# list the config parser, the resume check and the model card read.
OVERRIDE_KEYS = ("lr", "global_batch", "block_size", "warmup_ratio", "weight_decay", "betas", "grad_clip",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StagePreset:
    """Everything a stage fixes about what is trained and how."""

    name: str
    trains_embeddings: bool
    trains_lm_head: bool
    lora_r: Optional[int]  # None: the stage has no LoRA
    lora_alpha: Optional[int]
    lora_dropout: float
    lora_targets: Tuple[str, ...]
    lr: float
    global_batch: int  # sequences per optimizer step, across all ranks
    block_size: int  # tokens per sequence
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    description: str = field(default="", compare=False)

    @property
    def uses_lora(self) -> bool:
        return self.lora_r is not None

    @property
    def modules_to_save(self) -> Tuple[str, ...]:
        """Modules trained in full and saved with the adapter (LoRA stages)."""
        out = []
        if self.trains_embeddings:
            out.append("embed_tokens")
        if self.trains_lm_head:
            out.append("lm_head")
        return tuple(out)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    def with_overrides(self, **changes) -> "StagePreset":
        """A copy with some fields changed (e.g. from a YAML config); unknown keys are a ConfigError."""
        known = set(self.__dataclass_fields__)
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown stage preset key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **changes)


STAGES = {
    "stage1": StagePreset(
        name="stage1", trains_embeddings=True, trains_lm_head=False,
        lora_r=None, lora_alpha=None, lora_dropout=0.0, lora_targets=(),
        lr=2e-4, global_batch=1024, block_size=512,
        description="embed_tokens only: adapt the new Chinese rows with the transformer frozen"),
    "stage2": StagePreset(
        name="stage2", trains_embeddings=True, trains_lm_head=True,
        lora_r=8, lora_alpha=32, lora_dropout=0.05, lora_targets=ATTENTION,
        lr=1e-4, global_batch=1024, block_size=512,
        description="LoRA on attention + full embed_tokens and lm_head"),
    "sft": StagePreset(
        name="sft", trains_embeddings=True, trains_lm_head=True,
        lora_r=8, lora_alpha=32, lora_dropout=0.05, lora_targets=ATTENTION + MLP,
        lr=1e-4, global_batch=512, block_size=512,
        description="instruction tuning: LoRA on attention and MLP + full embed_tokens and lm_head"),
}


def get_stage(name: str) -> StagePreset:
    """The preset for a stage name, or a ConfigError listing the valid names."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage '{name}'; choose one of {', '.join(STAGES)}") from None


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps that make micro_batch x world_size x steps == global_batch.

    The global batch is what the hyperparameters were tuned for, so it is fixed; a combination that
    cannot reach it exactly is an error rather than a silently different batch.
    """
    for key, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        if global_batch % world_size:
            hint = (f"the global batch is not divisible by the world size at all; use a world size that divides "
                    f"{global_batch} or change global_batch")
        else:
            valid = _divisors(global_batch // world_size)
            hint = f"valid micro batches for world size {world_size}: {', '.join(map(str, valid))}"
        raise ConfigError(
            f"global_batch {global_batch} is not divisible by micro_batch {micro_batch} x world_size {world_size} "
            f"= {per_step}; {hint}")
    return global_batch // per_step
