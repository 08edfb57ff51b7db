"""The demo's steps: each runs the command a user runs at full scale, into DIR/<step>/.

`Demo.run_all` is the bookkeeping: a step whose inputs and settings match its DIR/<step>/.done.json is
reused, an interrupted one resumes in its directory, a changed one is redone with every step after it.
"""

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from transformers.utils import logging as hf_logging

from zhllama.app.smollm2 import materialize
from zhllama.bpe import is_bpe_json_base
from zhllama.corpus import expand_inputs, iter_documents
from zhllama.errors import UserError
from zhllama.export.evaluate import evaluate_docs, load_with_adapters
from zhllama.fsutil import atomic_write_json, atomic_write_text
from zhllama.modelio import load_model, load_tokenizer, save_pretrained_atomic, save_tokenizer
from zhllama.pretrain.pack import is_validation_doc
from zhllama.pretrain.shards import read_manifest, split_counts
from zhllama.sft.convert import record_to_json
from zhllama.sft.records import load_records
from zhllama.tiny import make_tiny_llama, make_tiny_sp, pretrain_tiny
from zhllama.vocab.report import stdlib_english_lines

from .report import fmt_s, plot_curves, summarise
from .runner import read_json, read_jsonl, say, train_stage, zhllama_command
from .settings import DATA, SMOLLM2, STAGE_OF, STEPS, ZH_INSTRUCTIONS

# Tokens predicted per forward pass when scoring held-out text; a longer document continues in the
# next window, which sees the one token before it (the demo's figures since its first version).
WINDOW = 512


class Demo:
    """The steps, their directories and done-markers. Step NAME is the method `step_NAME` (dashes as
    underscores): it gets its directory and returns its figures, which go into NAME/.done.json."""

    steps = STEPS

    def __init__(self, out: Path, settings: dict, *, base=None, ranks=2, zh_text=None, steps=None):
        self.out, self.settings, self.base, self.ranks, self.zh_text = out, settings, base, ranks, zh_text
        self.steps = tuple(steps or type(self).steps)   # a recipe's steps (settings.RECIPES)
        self.train_steps = tuple(s for s in self.steps if s in STAGE_OF)
        self.figures = {}  # step -> figures of its .done.json

    def dir(self, step: str) -> Path:
        return self.out / step

    # -- orchestration ----------------------------------------------------------------------------
    def _fingerprint_inputs(self, step: str, prev_id) -> dict:
        inputs = {"step": step, "settings": self.settings[step], "previous": prev_id}
        if step == "data":  # the inputs' names, sizes and times: an edited file redoes everything
            files = self.zh_text or [DATA / "zh_sample.txt"]
            files = [*files, DATA / "en_sample.txt", DATA / "sft_zh.jsonl"]
            if self.settings[step].get("sft_source"):
                files.append(self.settings[step]["sft_source"]["path"])
            inputs["files"] = [[str(p), p.stat().st_size, int(p.stat().st_mtime)] if p.is_file() else [str(p)]
                               for p in map(Path, files)]
        if step == "base":
            inputs["base"] = str(self.base) if self.base else "tiny"
        if step in self.train_steps:
            inputs["ranks"] = self.ranks
        return inputs

    def run_all(self, force=None) -> dict:
        t_all = time.perf_counter()
        say(f"zhllama demo: {len(self.steps)} steps into {self.out}")
        if hasattr(os, "getloadavg"):
            say(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start)")
        prev_id, redo = None, False
        reused = []
        for i, step in enumerate(self.steps, 1):
            tag = f"[{i:2d}/{len(self.steps)}] {step}"
            d = self.dir(step)
            want = self._fingerprint_inputs(step, prev_id)
            done = read_json(d / ".done.json")
            stale = done is None or done.get("inputs") != want
            if force == step:
                redo = True
            if not redo and not stale:
                self.figures[step] = done["figures"]
                reused.append(step)
                say(f"{tag}: done earlier, reused ({fmt_s(done['figures'].get('wall_s'))} then; "
                    f"--force {step} redoes it)")
                prev_id = done["id"]
                continue
            redo = True  # everything after a redone step is redone too
            started = read_json(d / ".started.json")
            if d.exists() and (started is None or started.get("inputs") != want or done is not None):
                shutil.rmtree(d)  # another configuration's leftovers: start clean
            elif d.exists():
                say(f"{tag}: resuming an interrupted run in {d}")
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / ".started.json", {"inputs": want})
            method = getattr(self, "step_" + step.replace("-", "_"))
            say(f"{tag}: {(method.__doc__ or '').strip().splitlines()[0] if method.__doc__ else ''}")
            t0 = time.perf_counter()
            figures = method(d)
            figures["wall_s"] = time.perf_counter() - t0
            record = {"id": uuid.uuid4().hex, "inputs": want, "figures": figures,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_json(d / ".done.json", record)
            self.figures[step] = figures
            prev_id = record["id"]
            say(f"{tag}: done in {fmt_s(figures['wall_s'])}")
        total = time.perf_counter() - t_all
        summary = self.summarise(total, reused)
        return summary

    # -- the steps --------------------------------------------------------------------------------
    def step_data(self, d: Path) -> dict:
        """the Chinese text, split into training and held-out documents; the English and SFT samples"""
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
        sft = s.get("sft_source")
        if sft:   # other field names (BELLE's question/std_answer) read and written as Alpaca records
            records, _ = load_records([sft["path"]], field_map=sft["field_map"])
            atomic_write_text(d / "sft.jsonl", "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n"
                                                       for r in records))
            say(f"    {len(records):,} instruction records from {sft['path']}")
        else:
            shutil.copyfile(DATA / "sft_zh.jsonl", d / "sft.jsonl")
        say(f"    {len(train)} training and {len(held)} held-out Chinese documents "
            f"({sum(map(len, held)):,} held-out characters) from {', '.join(str(p) for p in sources)}")
        return {"zh_docs": len(docs), "zh_train_docs": len(train), "zh_heldout_docs": len(held),
                "zh_heldout_chars": sum(map(len, held))}

    def step_base(self, d: Path) -> dict:
        """the base model: a tiny English LLaMA pretrained here (zhllama.tiny.pretrain_tiny), or the one given by --base"""
        if self.base == SMOLLM2:
            model = materialize(d / "model", overwrite=True)
            source = read_json(model / "source.json")
            say(f"    {source['package']}: {source['gguf']} (sha256 {source['gguf_sha256'][:16]}...) dequantized "
                f"to float32 into {model} (no pretraining)")
            return {"model": str(model), "external": True, "source": source}
        if self.base is not None:
            say(f"    using {self.base} as the base model (no pretraining)")
            return {"model": str(self.base), "external": True}

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
        say(f"    tiny LLaMA: {n_params / 1e6:.2f}M parameters, {s['num_layers']} layers x {s['hidden_size']}, "
            f"English vocabulary of {s['en_vocab']}; pretraining {s['steps']} steps of "
            f"{s['batch']} x {s['block_size']} tokens on {DATA.name}/en_sample.txt")
        metrics = pretrain_tiny(model, tok_dir / "tokenizer.model", self.dir("data") / "en.txt", steps=s["steps"],
                                batch=s["batch"], block_size=s["block_size"], lr=s["lr"], seed=s["seed"],
                                metrics_path=d / "metrics.jsonl", report=_progress(s["steps"]))
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
        bpe = is_bpe_json_base(self.base_model())   # a byte-level BPE base: BPE tokens learned under its pre-tokenizer
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
        say(f"    held-out Chinese tokens per character: base {base_r['zh_tokens_per_char']:.3f} "
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
        inputs, figures = [self.dir("data") / "zh_all.txt"], {}
        share = self.settings["pack"].get("english_share")
        if share:
            en_file, figures["english"] = self.english_mix(d / "en_mix.txt", share)
            inputs.append(en_file)
        self.cli(["data", "pack", "--tokenizer", self.tokenizer(), "--input", *inputs,
                  "--block-size", self.settings["pack"]["block_size"], "--out", d / "packed",
                  "--validation-ratio", self.settings["data"]["validation_ratio"]])
        counts = split_counts(read_manifest(d / "packed"))
        return {"packed": str(d / "packed"), "splits": counts, **figures}

    def english_mix(self, out: Path, share: float):
        """English documents worth `share` of the pretraining tokens, so stages 1 and 2 keep seeing the
        base's language: English Wikipedia (`english_source`, ../shared/data/en/wikitext2_en.txt) when
        present, else paragraphs of English prose from the Python standard library's docstrings (offline,
        ~2 MB). Never the bundled English, whose held-out split the English column scores, so that
        column is text of another source that no stage trained on; and none that the pack's hash split
        would put in validation (its split stays Chinese only)."""
        tok = load_tokenizer(self.tokenizer())

        def token_counts(texts):
            return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []

        ratio = self.settings["data"]["validation_ratio"]
        zh = [x for x in (self.dir("data") / "zh_train.txt").read_text(encoding="utf-8").splitlines() if x]
        zh_tokens = sum(token_counts(zh))
        want = share / (1 - share) * zh_tokens
        source = self.settings["pack"].get("english_source", "stdlib")
        if source == "stdlib":
            lines = stdlib_english_lines(60000)
            candidates = [" ".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
            name = "standard-library prose"
        else:
            candidates = [x.strip() for x in Path(source).read_text(encoding="utf-8").splitlines() if x.strip()]
            name = Path(source).name
        candidates = [x for x in candidates if not is_validation_doc(x, ratio)]
        docs, have = [], 0
        for doc, n in zip(candidates, token_counts(candidates)):   # one batched tokenization
            if have >= want:
                break
            docs.append(doc)
            have += n
        if have < want:
            say(f"    English mix: {name} holds only {have:,} tokens of the {want:,.0f} wanted")
        atomic_write_text(out, "".join(x + "\n" for x in docs))
        say(f"    English mix: {len(docs):,} documents of {name}, {have:,} tokens ({have / (have + zh_tokens):.1%} "
            f"of the pretraining tokens)")
        return out, {"documents": len(docs), "tokens": have, "share": share, "source": name}

    def _train(self, step: str, d: Path, overrides: list) -> dict:
        s = self.settings[step]
        run_dir = d / "run"
        common = [f"out={run_dir}", f"model={self.resized()}", f"max_steps={s['max_steps']}",
                  f"global_batch={s['global_batch']}", f"micro_batch={s['micro_batch']}", f"lr={s['lr']}",
                  f"warmup_ratio={s.get('warmup_ratio', 0.1)}", "gradient_checkpointing=false", "tensorboard=false",
                  f"save_every={s.get('save_every') or max(1, s['max_steps'] // 2)}", "keep_last=1", "eval_batches=4",
                  f"eval_every={s.get('eval_every') or max(1, s['max_steps'] // 4)}"]
        if "seed" in s:
            common.append(f"seed={s['seed']}")
        # what else the recipe sets (LoRA shape, weight decay...), as `key=value` overrides of the preset
        common += [f"{k}={json.dumps(v)}" for k, v in s.get("overrides", {}).items()]
        world_size = train_stage(STAGE_OF[step], d, common + overrides, self.ranks)
        summary = read_json(run_dir / "summary.json")   # what `zhllama train` writes at the end
        if summary is None:
            raise UserError(f"step {step}: the training run ended without writing {run_dir / 'summary.json'}")
        records = read_jsonl(run_dir / "metrics.jsonl")
        tps = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        return {"run": str(run_dir), "adapter": str(run_dir / "final"), "steps": len(records),
                "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                "val_loss": val[-1] if val else None, "tokens_per_s": sum(tps) / len(tps),
                "trainable": summary.get("trainable"), "total_params": summary.get("total"),
                "trainable_pct": (100.0 * summary["trainable"] / summary["total"]
                                  if summary.get("trainable") else None),
                "world_size": world_size}

    def adapters_until(self, step: str) -> list:
        chain = []
        for name in self.train_steps:
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
        return self._train("stage2", d, [f"data={json.dumps(data)}", f"block_size={blk}",
                                         f"init_adapters={json.dumps(self.adapters_until('stage1'))}"])

    def step_pretrain(self, d: Path) -> dict:
        """the anchors' one pretraining stage (--recipe cla2) through launch/pretrain_stage2.sh: LoRA r=64
        on all seven projections + embed_tokens and lm_head, from the resized model"""
        blk = self.settings["pack"]["block_size"]
        return self._train("pretrain", d, [f"data={json.dumps([self.figures['pack']['packed']])}",
                                           f"block_size={blk}", "init_adapters=[]"])

    def step_sft(self, d: Path) -> dict:
        """instruction SFT through launch/sft.sh: LoRA on all projections + embeddings, from pretraining"""
        s = self.settings["sft"]
        return self._train("sft", d, [f"data=[\"{self.dir('data') / 'sft.jsonl'}\"]",
                                      f"block_size={s['block_size']}", f"template={s['template']}",
                                      f"init_adapters={json.dumps(self.adapters_until(self.train_steps[-2]))}"])

    def step_merge(self, d: Path) -> dict:
        """zhllama merge: the training steps' adapters folded into one HF checkpoint"""
        args = ["merge", "--base", self.resized()]
        for a in self.adapters_until("sft"):
            args += ["--adapter", a]
        self.cli(args + ["--out", d / "model"])
        return {"model": str(d / "model")}

    def step_generate(self, d: Path) -> dict:
        """zhllama generate: an instruction from the SFT data, with the SFT template"""
        record = json.loads((self.dir("data") / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
        model = self.figures["merge"]["model"]
        args = ["generate", "--model", model, "--template", self.settings["sft"]["template"],
                "--prompt", record["instruction"], "--max-new-tokens", self.settings["generate"]["max_new_tokens"],
                "--seed", 0]   # sampled, but the same answer on every run
        text = self.cli(args, capture=True)
        atomic_write_text(d / "generation.txt", text)
        say(f"    instruction: {record['instruction']}\n    trained answer: {record['output']}\n"
            f"    generated: {text.strip()[:300]}")
        figures = {"instruction": record["instruction"], "reference": record["output"], "generated": text.strip()}
        if self.base == SMOLLM2:   # three Chinese instructions, base vs final model
            figures["answers"] = {name: self.answers(m, d / f"answers_{name}.jsonl")
                                  for name, m in (("base", self.base_model()), ("final", model))}
        return figures

    def answers(self, model, out: Path) -> list:
        """zhllama generate --json on ZH_INSTRUCTIONS (the SFT template; `generate`'s sampling defaults,
        temperature 0.7 and top-p 0.9, seeded with 0 before each answer, so a rerun gives the same answers):
        the answers in order. Greedy decoding makes a model this small repeat itself."""
        args = ["generate", "--model", model, "--template", self.settings["sft"]["template"], "--seed", 0, "--json",
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
        for step in self.train_steps:
            models[step] = (self.resized(), self.tokenizer(), self.adapters_until(step))
        per_stage = {}
        for name, (model, tok, adapters) in models.items():
            per_stage[name] = heldout_figures(model, tok, adapters, docs, en_docs)
            say(f"    {name:<7} held-out loss {per_stage[name]['loss']:.3f} nats/token, "
                f"{per_stage[name]['bits_per_char']:.3f} bits/char ({per_stage[name]['tokens']:,} tokens)"
                + (f"; English {per_stage[name]['en_bits_per_char']:.3f} bits/char" if en_docs else ""))
        result = {"per_stage": per_stage}
        merged = self.figures["merge"]["model"]
        res = json.loads(self.cli(["eval", "--model", merged, "--text", heldout, "--json"], capture=True))
        r = res["results"][0]
        result["zhllama_eval"] = {k: r.get(k) for k in ("loss", "bits_per_char", "perplexity", "tokens_per_s")}
        if en_docs:   # the merged checkpoint on held-out English, by the same command
            en = json.loads(self.cli(["eval", "--model", merged, "--text", en_heldout,
                                      "--json"], capture=True))["results"][0]
            result["merged_en_bits_per_char"] = en.get("bits_per_char")
        say(f"    zhllama eval, merged checkpoint: {r['loss']:.3f} nats/token, {r['bits_per_char']:.3f} bits/char "
            f"(the adapters applied in-process gave {per_stage['sft']['bits_per_char']:.3f}), "
            f"{r['tokens_per_s']:,.0f} tokens/s")
        png = d / "loss_curves.png"
        if plot_curves(self._curves(), png):
            result["png"] = str(png)
        return result

    # -- running commands -------------------------------------------------------------------------
    def cli(self, args, capture=False) -> str:
        """Run `zhllama ARGS` in a subprocess (what a user types); stop the demo if it fails."""
        return zhllama_command(args, capture)

    # -- the end ----------------------------------------------------------------------------------
    def _curves(self) -> dict:
        curves = {}
        if not self.figures["base"].get("external"):
            curves["base (English, full pretraining)"] = read_jsonl(self.dir("base") / "metrics.jsonl")
        for step in self.train_steps:
            curves[step] = read_jsonl(Path(self.figures[step]["run"]) / "metrics.jsonl")
        return curves

    def summarise(self, total_s: float, reused: list) -> dict:
        return summarise(self, total_s, reused)


def heldout_figures(model_dir, tokenizer_dir, adapters, docs, en_docs=None) -> dict:
    """One stage's model (adapters folded in, in order) scored by `zhllama eval`'s evaluator: held-out
    Chinese loss (nats per token of its own tokenizer) and bits per character, and with `en_docs` the
    held-out English bits per character too. Scored on CPU in fp32, as the table always was."""
    hf_logging.disable_progress_bar()   # no weight-loading bars between the demo's lines
    model, tok = load_with_adapters(model_dir, tokenizer_dir, adapters, device="cpu", dtype="float32")
    zh = evaluate_docs(model, tok, docs, max_length=WINDOW + 1, stride=WINDOW)
    out = {"loss": zh["loss"], "bits_per_char": zh["bits_per_char"], "tokens": zh["scored_tokens"],
           "chars": zh["characters"], "documents": zh["documents"]}
    if en_docs:
        out["en_bits_per_char"] = evaluate_docs(model, tok, en_docs, max_length=WINDOW + 1,
                                                stride=WINDOW)["bits_per_char"]
    return out


def _progress(steps: int):
    """The base pretraining's progress lines: six of them, and the last step."""
    def report(r):
        if r["step"] % max(1, steps // 6) == 0 or r["step"] == steps:
            say(f"    step {r['step']}/{steps} loss {r['loss']:.3f} ({r['tokens_per_s']:,.0f} tokens/s)")
    return report
