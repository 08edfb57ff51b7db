"""Sizing the SmolLM2-135M run of `zhllama demo --base smollm2-135m`: short runs from one resized base.

  python bench/smollm2_sweep.py prep       --work runs/smol_sweep
  python bench/smollm2_sweep.py throughput --work runs/smol_sweep [--steps 12] [--repeats 2]
  python bench/smollm2_sweep.py sweep      --work runs/smol_sweep --english-share 0 0.1 0.2 \\
         --split 50:190 --lr 2e-3 [--sft] [--name-prefix x]

`prep` runs the demo's own steps (data, base, vocab-train, vocab-merge, resize) with the demo's SmolLM2
settings into WORK/demo, so every run below starts from the very base, tokenizer and resized checkpoint
the demo uses; packs are made on demand (one per English share and block size, by the demo's pack
step). `throughput` times short stage-1 and stage-2 runs of `zhllama train` in turn (1 rank x 2 threads,
2 ranks x 1 thread under the deepspeed launcher; micro-batch; block size 128 vs 256), interleaved and
repeated so that every setup sees the same machine load, and prints median tokens/s and the ratio to
the demo's old setup (2 ranks x 1 thread, micro-batch 4, block 128). `sweep` trains stage 1 then stage 2
(then SFT with --sft) for every combination of the options given, and scores held-out Chinese and
English bits per character after each stage with the demo's evaluator (`heldout_figures`: `zhllama
eval`'s `evaluate_docs`, windows of 512): the first 200 held-out Chinese news sentences and the bundled
English held-out paragraphs (9,212 characters; the English replay is another source). Finished runs are
reused; results are appended to WORK/results.jsonl and printed as a table with ratios to the base.

The machine may be shared: compare tokens/s only within one `throughput` call, and bits/char (which
do not depend on load) across calls.
"""

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from zhllama.app.demo import Demo, heldout_figures, smollm2_settings
from zhllama.app.demo.runner import read_json, read_jsonl, train_stage
from zhllama.app.demo.settings import SHARED_ZH, SMOLLM2, STEPS

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PREP_STEPS = STEPS[:STEPS.index("pack")]   # data .. resize


class PrepDemo(Demo):
    """The demo's steps up to the resize; packs on demand into WORK/packs/<share>_<block>."""

    def summarise(self, total_s, reused):
        return {}

    def pack(self, share: float, block: int) -> str:
        d = self.out.parent / "packs" / f"en{share:g}_b{block}"
        if (d / "done.json").is_file():
            return json.loads((d / "done.json").read_text())["packed"]
        d.mkdir(parents=True, exist_ok=True)
        self.settings["pack"].update(english_share=share, block_size=block)
        figures = self.step_pack(d)
        (d / "done.json").write_text(json.dumps(figures))
        return figures["packed"]


def prep(work: Path) -> PrepDemo:
    settings = smollm2_settings(quick=False)
    zh = [SHARED_ZH.resolve()] if SHARED_ZH.is_dir() else None
    demo = PrepDemo(work / "demo", settings, base=SMOLLM2, zh_text=zh, steps=PREP_STEPS)
    demo.run_all()
    return demo


def heldout_docs(demo: PrepDemo):
    zh = [x for x in (demo.dir("data") / "zh_heldout.txt").read_text(encoding="utf-8").splitlines() if x]
    en = [x for x in (demo.dir("data") / "en_heldout.txt").read_text(encoding="utf-8").splitlines() if x]
    return zh[:demo.settings["data"]["max_heldout_docs"]], en


def remove_shm_buffers(logs: Path) -> None:
    """DeepSpeed leaves a ~70 MB /dev/shm buffer per rank behind (docs/training.md); a sweep of many runs
    would fill the memory. Remove those of this run's launcher ports only (read from its logs)."""
    ports = {m.group(1) for f in logs.glob("*.log") for m in re.finditer(r"--master_port[ =](\d+)", f.read_text())}
    for port in ports:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)


def train(demo: PrepDemo, stage: str, run_dir: Path, overrides: list, ranks: int, env: dict = None) -> dict:
    """One `zhllama train` run into run_dir/run (reused when finished): its summary and metrics."""
    if not (run_dir / "run" / "summary.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            train_stage(stage, run_dir, [f"out={run_dir / 'run'}", f"model={demo.resized()}", "tensorboard=false",
                                         "gradient_checkpointing=false", "keep_last=1", *overrides], ranks)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            remove_shm_buffers(run_dir / "logs")
    return {"summary": read_json(run_dir / "run" / "summary.json"),
            "metrics": read_jsonl(run_dir / "run" / "metrics.jsonl")}


# ------------------------------------------------------------------------------------------- throughput

SETUPS = {   # name -> (ranks, micro_batch, block): the old demo setup first (the baseline)
    "2x1 micro4 b128": (2, 4, 128),
    "1x2 micro4 b128": (1, 4, 128),
    "1x2 micro8 b128": (1, 8, 128),
    "1x2 micro2 b256": (1, 2, 256),
    "1x2 micro4 b256": (1, 4, 256),
}


def throughput(demo: PrepDemo, args) -> None:
    rows = {}
    order = list(SETUPS)
    for rep in range(args.repeats):
        for name in (order if rep % 2 == 0 else order[::-1]):   # alternate the order between repeats
            ranks, micro, block = SETUPS[name]
            packed = demo.pack(0.1, block)
            chain = []
            for stage in ("stage1", "stage2"):
                tag = f"{name.replace(' ', '_')}_{stage}_r{rep}"
                out = args.work / "throughput" / tag
                res = train(demo, stage, out, [f"data={json.dumps([packed])}", f"block_size={block}",
                                               f"init_adapters={json.dumps(chain)}",
                                               f"max_steps={args.steps}", f"global_batch={args.global_batch}",
                                               f"micro_batch={micro}", "lr=2e-3", "warmup_ratio=0.1",
                                               f"save_every={args.steps}", "eval_every=0", "eval_batches=1"],
                            ranks)
                chain = [str(out / "run" / "final")]
                tps = [r["tokens_per_s"] for r in res["metrics"][2:]]   # the first steps warm up
                rows.setdefault((name, stage), []).append(statistics.median(tps))
                print(f"  {tag}: median {statistics.median(tps):,.0f} tokens/s", flush=True)
    base = {stage: statistics.median(rows[(order[0], stage)]) for stage in ("stage1", "stage2")}
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{args.steps} steps of {args.global_batch} sequences, median of the per-step tokens/s after step 2, "
          f"median over {args.repeats} interleaved repeats")
    print(f"| setup (ranks x threads, micro-batch, block) | stage 1 tokens/s | ratio | stage 2 tokens/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in order:
        s1, s2 = (statistics.median(rows[(name, s)]) for s in ("stage1", "stage2"))
        print(f"| {name} | {s1:,.0f} | {s1 / base['stage1']:.2f} | {s2:,.0f} | {s2 / base['stage2']:.2f} |")


# ------------------------------------------------------------------------------------------------ sweep

TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def config_name(c: dict) -> str:
    parts = [f"en{c['english_share']:g}", f"s{c['stage1_steps']}+{c['stage2_steps']}", f"lr{c['lr']:g}"]
    if c.get("lr1") is not None:
        parts.append(f"lr1_{c['lr1']:g}")
    for key, short in (("embed_lr_base", "base"), ("embed_lr_new", "new"), ("lora_r", "r"),
                       ("block", "b"), ("sft_steps", "sft")):
        if c.get(key) is not None:
            parts.append(f"{short}{c[key]:g}")
    if c.get("lora_targets"):
        parts.append(c["lora_targets"])
    return "_".join(parts)


def sweep(demo: PrepDemo, args) -> None:
    zh_docs, en_docs = heldout_docs(demo)
    s = demo.settings
    results_file = args.work / "results.jsonl"
    base_fig = args.work / "base_figures.json"
    if not base_fig.is_file():
        fig = heldout_figures(demo.base_model(), demo.base_model(), [], zh_docs, en_docs)
        base_fig.write_text(json.dumps(fig))
    base = json.loads(base_fig.read_text())
    print(f"base: zh {base['bits_per_char']:.3f} bits/char, en {base['en_bits_per_char']:.3f}", flush=True)
    grid = itertools.product(args.english_share, args.split, args.lr, args.lr1 or [None], args.embed_lr_base or [None],
                             args.embed_lr_new or [None], args.lora_r or [None], args.lora_targets or [None], args.block)
    for share, split, lr, lr1, base_lr, new_lr, lora_r, targets, block in grid:
        n1, n2 = (int(x) for x in split.split(":"))
        c = {"english_share": share, "stage1_steps": n1, "stage2_steps": n2, "lr": lr, "lr1": lr1,
             "embed_lr_base": base_lr, "embed_lr_new": new_lr, "lora_r": lora_r, "lora_targets": targets,
             "block": block if block != 128 else None, "sft_steps": args.sft_steps if args.sft else None}
        name = args.name_prefix + config_name(c)
        packed = demo.pack(share, block)
        common = [f"data={json.dumps([packed])}", f"block_size={block}", f"global_batch={args.global_batch}",
                  f"micro_batch={args.micro_batch}", "warmup_ratio=0.1", "eval_every=0", "eval_batches=4"]
        if base_lr is not None:
            common.append(f"embed_lr_base={base_lr}")
        if new_lr is not None:
            common.append(f"embed_lr_new={new_lr}")
        runs, chain, out = {}, [], {"name": name, **c}
        plan = [("stage1", n1, lr1 if lr1 is not None else lr, 42), ("stage2", n2, lr, 43)]
        if args.sft:
            plan.append(("sft", args.sft_steps, args.sft_lr, 44))
        for stage, steps, stage_lr, seed in plan:
            if steps == 0:
                continue
            d = args.work / "sweep" / name / stage
            t0 = time.perf_counter()
            if stage == "sft":
                data = [f"data={json.dumps([str(demo.dir('data') / 'sft.jsonl')])}", f"block_size={s['sft']['block_size']}",
                        f"template={s['sft']['template']}", f"global_batch={args.global_batch}",
                        f"micro_batch={args.micro_batch}", "warmup_ratio=0.1", "eval_every=0"]
            else:
                data = common
                if stage == "stage2" and lora_r is not None:   # alpha / r kept at the preset's 4
                    data = data + [f"lora_r={lora_r}", f"lora_alpha={4 * lora_r}"]
                if stage == "stage2" and targets is not None:
                    data = data + [f"lora_targets={json.dumps(TARGETS[targets])}"]
            res = train(demo, stage, d, [*data, f"max_steps={steps}", f"lr={stage_lr}", f"seed={seed}",
                                         f"save_every={steps}", f"init_adapters={json.dumps(chain)}"], args.ranks)
            chain = chain + [str(d / "run" / "final")]
            fig_file = d / "heldout.json"
            if not fig_file.is_file():
                fig_file.write_text(json.dumps(heldout_figures(demo.resized(), demo.tokenizer(), chain,
                                                               zh_docs, en_docs)))
            fig = json.loads(fig_file.read_text())
            tps = [r["tokens_per_s"] for r in res["metrics"][1:]] or [res["metrics"][0]["tokens_per_s"]]
            runs[stage] = {"zh": fig["bits_per_char"], "en": fig["en_bits_per_char"], "steps": steps,
                           "tokens_per_s": statistics.median(tps), "wall_s": time.perf_counter() - t0}
            print(f"  {name} {stage}: zh {fig['bits_per_char']:.3f} ({fig['bits_per_char'] / base['bits_per_char']:.3f}"
                  f" x base), en {fig['en_bits_per_char']:.3f} ({fig['en_bits_per_char'] / base['en_bits_per_char']:.3f}"
                  f" x base)", flush=True)
        out["stages"] = runs
        out["base"] = {"zh": base["bits_per_char"], "en": base["en_bits_per_char"]}
        with results_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(out) + "\n")
    print_table(results_file)


def print_table(results_file: Path) -> None:
    """Every result so far (the last of each name): zh after stage 2, en after stage 2 and after SFT."""
    last = {}
    for line in results_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        last[r["name"]] = r
    print("| run | zh bits/char after stage 2 (x base) | en after stage 2 (x base) | en after SFT (x base) |")
    print("| --- | --- | --- | --- |")
    for name, r in last.items():
        b, st = r["base"], r["stages"]
        s2 = st.get("stage2") or st.get("stage1")
        sft = st.get("sft")
        print(f"| {name} | {s2['zh']:.3f} ({s2['zh'] / b['zh']:.3f}) | {s2['en']:.3f} ({s2['en'] / b['en']:.3f}) | "
              + (f"{sft['en']:.3f} ({sft['en'] / b['en']:.3f}) |" if sft else "- |"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prep", "throughput", "sweep", "table"))
    ap.add_argument("--work", type=Path, default=Path("runs/smol_sweep"))
    ap.add_argument("--steps", type=int, default=12, help="throughput: steps a run")
    ap.add_argument("--repeats", type=int, default=2, help="throughput: interleaved repeats")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8, help="sweep: micro-batch (1 rank)")
    ap.add_argument("--ranks", type=int, choices=(1, 2), default=1, help="sweep: training ranks")
    ap.add_argument("--english-share", type=float, nargs="+", default=[0.1])
    ap.add_argument("--split", nargs="+", default=["50:190"], help="stage-1:stage-2 steps")
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-3], help="stage-2 lr (and stage 1's without --lr1)")
    ap.add_argument("--lr1", type=float, nargs="+", help="stage-1 lr")
    ap.add_argument("--embed-lr-base", type=float, nargs="+", help="base-row lr multiple (needs the per-row groups)")
    ap.add_argument("--embed-lr-new", type=float, nargs="+", help="new-row lr multiple (needs the per-row groups)")
    ap.add_argument("--lora-r", type=int, nargs="+", help="stage-2 LoRA rank (alpha = 4 r, as the preset's 32/8)")
    ap.add_argument("--lora-targets", nargs="+", choices=tuple(TARGETS), help="stage-2 LoRA targets")
    ap.add_argument("--block", type=int, nargs="+", default=[128])
    ap.add_argument("--sft", action="store_true", help="also SFT after stage 2 (the demo's SFT data)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--sft-lr", type=float, default=3e-4)
    ap.add_argument("--name-prefix", default="")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if args.what == "table":
        print_table(args.work / "results.jsonl")
        return 0
    demo = prep(args.work)
    if args.what == "throughput":
        throughput(demo, args)
    elif args.what == "sweep":
        sweep(demo, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
