"""What the demo runs: its steps, where its inputs are, and the sizes of every step.

`demo_settings` sizes the tiny English base's run (CPU, minutes); `smollm2_settings` the same steps on
SmolLM2-135M (`--base smollm2-135m`). A step's settings are part of its fingerprint: change one and
that step is redone with every step after it.
"""

from pathlib import Path

import zhllama

# The package's sample data, and the checkout it sits in (launchers, ../shared), found from the core
# package rather than from this file, which lives two folders down in zhllama/app/demo/.
PACKAGE = Path(zhllama.__file__).resolve().parent
REPO = PACKAGE.parent
DATA = PACKAGE / "data"
# Chinese instructions with reference answers (question/std_answer), used by the SmolLM2 run when present.
SHARED_SFT = REPO.parent / "shared" / "data" / "sft" / "belle_eval_set_zh.json"
STEPS = ("data", "base", "vocab-train", "vocab-merge", "resize", "pack", "stage1", "stage2", "sft",
         "merge", "generate", "eval")
TRAIN_STEPS = ("stage1", "stage2", "sft")
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
# Asked of the base and the final model at the end of a --base smollm2-135m run (not in the SFT data).
ZH_INSTRUCTIONS = ("用一句话介绍北京。", "请写一句关于春天的诗。", "如何保持健康的生活习惯？")


def smollm2_settings(quick: bool) -> dict:
    """The demo's steps sized for SmolLM2-135M on 2 CPU cores (about 40 minutes on an idle machine;
    `--quick` is a smoke run).

    The learning rates come from short runs on the same data (stage 2 at 2e-3 beat 5e-4 by 0.1 nats of
    held-out loss after 20 steps; training only the new embedding rows in stage 1 learned far slower
    than the whole tied matrix). Stage 2 gets most of the steps: LoRA moves the held-out loss faster
    per token than embeddings alone. A tenth of the pretraining tokens is English (`english_share`)
    to hold on to the base's English; SFT reads BELLE's Chinese eval set of ../shared when present (631 of its 1,000 instructions have a
    reference answer; the others are skipped as records without an output).
    """
    s = demo_settings(quick)
    s["data"] = {"validation_ratio": 0.1, "max_zh_docs": 400 if quick else 20000,
                 "max_heldout_docs": 8 if quick else 200}
    if SHARED_SFT.is_file():
        s["data"]["sft_source"] = {"path": str(SHARED_SFT), "field_map": "instruction=question,output=std_answer"}
    s["vocab-train"] = {"vocab_size": 1500 if quick else 6000}
    s["pack"] = {"block_size": 128, "english_share": 0.1}
    steps = {"stage1": 2 if quick else 50, "stage2": 2 if quick else 190, "sft": 2 if quick else 40}
    for step, lr, seed in (("stage1", 2e-3, 42), ("stage2", 2e-3, 43), ("sft", 3e-4, 44)):
        # a checkpoint of a 135M model + Adam state costs seconds on a busy disk: few of them.
        # Each stage draws its own block order (seed), so stage 2 does not replay stage 1's first blocks.
        s[step] = {"max_steps": steps[step], "global_batch": 8, "micro_batch": 4, "lr": lr, "seed": seed,
                   "save_every": 2 if quick else 50, "eval_every": 2 if quick else 25}
    s["sft"].update(block_size=256, template="chinese-alpaca")
    s["generate"] = {"max_new_tokens": 16 if quick else 64}
    return s
