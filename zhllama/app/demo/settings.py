"""What the demo runs: its steps, where its inputs are, and the sizes of every step.

`demo_settings` sizes the tiny English base's run (CPU, minutes); `smollm2_settings` the same steps on
SmolLM2-135M (`--base smollm2-135m`); `cla2_settings` turns either into the anchors' recipe
(`--recipe cla2`). A step's settings are part of its fingerprint: change one and that step is redone
with every step after it.
"""

import copy
import os
from pathlib import Path

import zhllama
from zhllama.pretrain.presets import ATTENTION, MLP, STAGES

# The package's sample data, and the checkout it sits in (launchers, ../shared), found from the core
# package rather than from this file, which lives two folders down in zhllama/app/demo/.
PACKAGE = Path(zhllama.__file__).resolve().parent
REPO = PACKAGE.parent
DATA = PACKAGE / "data"
# The shared data next to the checkout (`../shared`, or $ZHLLAMA_SHARED as for the tests and benches):
# optional, the demo runs without it.
SHARED = Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))
SHARED_ZH = SHARED / "data" / "zh"
# Chinese instructions with reference answers (question/std_answer), used by the SmolLM2 run when present.
SHARED_SFT = SHARED / "data" / "sft" / "belle_eval_set_zh.json"
# English Wikipedia paragraphs: the English replay of the SmolLM2 run when present (else standard-library
# prose). Never the bundled English, whose held-out split is what the English column scores.
SHARED_EN = SHARED / "data" / "en" / "wikitext2_en.txt"
STEPS = ("data", "base", "vocab-train", "vocab-merge", "resize", "pack", "stage1", "stage2", "sft",
         "merge", "generate", "eval")
TRAIN_STEPS = ("stage1", "stage2", "sft")
# The anchors' recipe: one pretraining stage instead of stages 1 and 2.
CLA2_STEPS = ("data", "base", "vocab-train", "vocab-merge", "resize", "pack", "pretrain", "sft",
              "merge", "generate", "eval")
RECIPES = {"ours": STEPS, "cla2": CLA2_STEPS}
ALL_STEPS = tuple(dict.fromkeys(STEPS + CLA2_STEPS))
# The stage preset (configs/<stage>.yaml, launch/...) each training step runs.
STAGE_OF = {"stage1": "stage1", "stage2": "stage2", "pretrain": "stage2", "sft": "sft"}
LAUNCHERS = {"stage1": "pretrain_stage1.sh", "stage2": "pretrain_stage2.sh", "sft": "sft.sh"}


def demo_settings(quick: bool) -> dict:
    """Sizes and steps of every step. `--quick` (the tests) trains fewer steps, same shapes otherwise."""
    return {
        "data": {"validation_ratio": 0.1, "max_zh_docs": 3000},
        "base": {"en_vocab": 1000, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
                 "intermediate_size": 344, "max_position_embeddings": 1024, "block_size": 64,
                 "batch": 16, "steps": 40 if quick else 300, "lr": 3e-3, "seed": 0},
        "vocab-train": {"vocab_size": 3000},
        "vocab-merge": {},
        "resize": {"init": "subword-mean"},
        "pack": {"block_size": 64},
        # lr: far above the 7B presets (1e-4/2e-4), because the model is tiny and the runs are short.
        "stage1": {"max_steps": 10 if quick else 60, "global_batch": 8, "micro_batch": 2, "lr": 1e-2},
        "stage2": {"max_steps": 10 if quick else 60, "global_batch": 8, "micro_batch": 2, "lr": 5e-3},
        "sft": {"max_steps": 8 if quick else 40, "global_batch": 8, "micro_batch": 2, "lr": 2e-3,
                "block_size": 192, "template": "chinese-alpaca"},
        "merge": {},
        "generate": {"max_new_tokens": 48},
        "eval": {},
    }


SMOLLM2 = "smollm2-135m"
# The base's own embedding rows learn at this multiple of each stage's lr (the new rows at the full lr).
SMOLLM2_EMBED_LR_BASE = 0.1
# Asked of the base and the final model at the end of a --base smollm2-135m run (not in the SFT data).
ZH_INSTRUCTIONS = ("用一句话介绍北京。", "请写一句关于春天的诗。", "如何保持健康的生活习惯？")


def smollm2_settings(quick: bool) -> dict:
    """The demo's steps sized for SmolLM2-135M on 2 CPU cores (under 60 minutes on an idle machine;
    `--quick` is a smoke run).

    The learning rates come from short runs on the same data (stage 2 at 2e-3 beat 5e-4 by 0.1 nats of
    held-out loss after 20 steps; over 310 steps 2e-3 diverged, so stage 2 runs at 1e-3). Stage 2 gets
    most of the steps: LoRA moves the held-out loss faster per token than embeddings alone. Two knobs
    hold on to the base's English, both chosen from the short runs of docs/benchmarks.md
    (bench/smollm2_sweep.py): a tenth of the pretraining tokens is English (`english_share`), and the
    base's own embedding rows learn at a tenth of each stage's lr (`embed_lr_base` 0.1: English +1.9%
    after stage 2 against +16.0% with every row at the full lr, for 2.4 points of the Chinese gain; the
    full run ends SFT at 0.997 x the base's English bits/char). SFT reads BELLE's Chinese eval set of
    ../shared when present (631 of its 1,000 instructions have a reference answer; the others are
    skipped as records without an output).
    """
    s = demo_settings(quick)
    s["data"] = {"validation_ratio": 0.1, "max_zh_docs": 400 if quick else 20000,
                 "max_heldout_docs": 8 if quick else 200}
    if SHARED_SFT.is_file():
        s["data"]["sft_source"] = {"path": str(SHARED_SFT), "field_map": "instruction=question,output=std_answer"}
    s["vocab-train"] = {"vocab_size": 1500 if quick else 6000}
    s["pack"] = {"block_size": 128, "english_share": 0.1,
                 "english_source": str(SHARED_EN) if SHARED_EN.is_file() else "stdlib"}
    # Stage 1 with the base rows slowed moves held-out Chinese little (the short runs): most steps go to
    # stage 2. Each evaluation scores the pack's whole validation split (2,000+ news sentences, about 2
    # minutes here), so a stage evaluates two or three times, not every 25 steps.
    # Stage 2 at 2e-3 (best over 20 steps) diverged in the 310-step run (gradient norm up to 220 at steps
    # 44-56, training loss 6.5 -> 8.8): 1e-3 for the long schedule.
    for step, max_steps, eval_every, lr, seed in (("stage1", 20, 20, 2e-3, 42), ("stage2", 310, 155, 1e-3, 43),
                                                  ("sft", 40, 20, 3e-4, 44)):
        # a checkpoint of a 135M model + Adam state costs seconds on a busy disk: few of them.
        # Each stage draws its own block order (seed), so stage 2 does not replay stage 1's first blocks.
        s[step] = {"max_steps": 2 if quick else max_steps, "global_batch": 8, "micro_batch": 4, "lr": lr,
                   "seed": seed, "save_every": 2 if quick else 50, "eval_every": 2 if quick else eval_every,
                   "overrides": {"embed_lr_base": SMOLLM2_EMBED_LR_BASE}}
    s["sft"].update(block_size=256, template="chinese-alpaca")
    s["generate"] = {"max_new_tokens": 16 if quick else 64}
    return s


# Chinese-LLaMA-Alpaca-2's pretraining (scripts/training/run_pt.sh at ymcui/Chinese-LLaMA-Alpaca-2@f4edad3):
# LoRA r=64, alpha=128, dropout 0.05 on the seven projections, embed_tokens and lm_head trained in full
# (modules_to_save), lr 2e-4, 5% warmup then cosine, weight decay 0.01, one stage, Chinese text only.
CLA2_LR = 2e-4
CLA2_LORA = {"lora_r": 64, "lora_alpha": 128, "lora_dropout": 0.05, "lora_targets": list(ATTENTION + MLP),
             "weight_decay": 0.01}
CLA2_WARMUP = 0.05


def cla2_settings(ours: dict) -> dict:
    """Our recipe's settings turned into Chinese-LLaMA-Alpaca-2's (`--recipe cla2`), on the same budget.

    New rows by transformers' default resize (`--init hf-mean`); no English; one stage of LoRA (CLA2_LORA)
    plus full embeddings for as many steps as our stages 1 and 2 together, with the same global batch
    and block size (so the same tokens); its lr is 2e-4 scaled as ours is: our stage-2 lr over the 7B
    stage-2 preset's (1e-4), times 2e-4. The SFT, the data and the vocabulary are ours, except that every
    embedding row learns at the SFT's lr (the anchors have no per-row learning rates).
    """
    s = copy.deepcopy(ours)
    s["sft"].pop("overrides", None)
    s["resize"] = {"init": "hf-mean"}
    s["pack"] = {k: v for k, v in s["pack"].items() if k not in ("english_share", "english_source")}
    s1, s2 = s.pop("stage1"), s.pop("stage2")
    if (s1["global_batch"], s1.get("block_size")) != (s2["global_batch"], s2.get("block_size")):
        raise ValueError("cla2_settings: stages 1 and 2 differ in batch shape; the one stage cannot match both")
    scale = s2["lr"] / STAGES["stage2"].lr
    s["pretrain"] = {**s2, "max_steps": s1["max_steps"] + s2["max_steps"], "lr": CLA2_LR * scale,
                     "warmup_ratio": CLA2_WARMUP, "overrides": dict(CLA2_LORA), "recipe": "cla2"}
    return s


def recipe_settings(base_named: bool, quick: bool, recipe: str = "ours") -> dict:
    """The demo's settings for a base (the tiny one, or SmolLM2 when `base_named`) and a recipe."""
    ours = smollm2_settings(quick) if base_named else demo_settings(quick)
    return cla2_settings(ours) if recipe == "cla2" else ours
