"""Benchmark `zhllama eval --benchmark cmmlu`: questions/s, batched vs a plain loop, same predictions.

Builds a tiny random LLaMA on the LLaMA tokenizer (hidden 64, 2 layers, init std 0.2 so its answers
vary), scores the CMMLU test files of a few subjects with `evaluate_model` (batched, last position
only through lm_head), then scores the same prompts one at a time through the full model (the
baseline), and prints both speeds, the ratio, and whether every prediction agrees.

Needs ../shared (data/llama/tokenizer.model, data/eval/cmmlu).

  python bench/mc_eval.py                                   # 3 subjects, 5-shot
  python bench/mc_eval.py --shots 0 --subjects agronomy --limit 50
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from shared_data import need  # bench/ is on sys.path when a bench runs as a script
from zhllama.export.benchmark import CMMLU, Prompter, evaluate_model, load_subjects
from zhllama.modelio import load_for_inference, load_tokenizer, save_pretrained_atomic
from zhllama.tiny import tiny_llama_config


def _tiny_model(out: Path) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(need("data/llama/tokenizer.model"))
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok), initializer_range=0.2, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    return save_pretrained_atomic(LlamaForCausalLM(cfg), tok, out)


def _loop(model, tok, prompts):
    import torch

    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1, letters]
            out.append("ABCD"[max(range(4), key=lambda i: (logits[i].item(), -i))])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="agronomy,arts,college_mathematics")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import torch

    data = need("data/eval/cmmlu")
    subjects = load_subjects(data, CMMLU, args.shots, args.subjects.split(","), args.limit)
    with tempfile.TemporaryDirectory(prefix="zhllama-mc-") as tmp:
        model, tok = load_for_inference(_tiny_model(Path(tmp) / "tiny"), device="cpu", dtype="float32")
        summary, preds = evaluate_model(model, tok, subjects, CMMLU, args.shots, 2048, args.batch_size)
        prompter = Prompter(tok, CMMLU, args.shots, 2048)
        prompts = [prompter.prompt(s, q) for s in subjects for q in s.questions]
        t0 = time.perf_counter()
        loop = _loop(model, tok, prompts)
        loop_s = time.perf_counter() - t0
    flat = [p for s in subjects for p in preds[s.name]]
    same = sum(a == b for a, b in zip(flat, loop))
    n = len(prompts)
    print(f"{n} questions, {len(subjects)} subjects, {args.shots}-shot, torch threads {torch.get_num_threads()}")
    print(f"zhllama eval (batch {args.batch_size}): {summary['questions_per_s']:.1f} questions/s "
          f"({summary['seconds']:.1f} s, prompts and tokenization included), accuracy "
          f"{100 * summary['accuracy']:.2f}")
    print(f"plain loop, full model:   {n / loop_s:.1f} questions/s ({loop_s:.1f} s)")
    print(f"ratio {summary['seconds'] and loop_s / summary['seconds']:.2f}x; identical predictions: {same}/{n}")
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
