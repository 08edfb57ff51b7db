"""Benchmark `zhllama data pack` against its baselines, in one command, on the same text.

  1. raw sentencepiece: `sp.encode(documents, num_threads=N)` on text already in memory (the
     tokenizer's own speed; no reading, no packing, no writing). Goal: pack >= 0.7 of it end to end.
  2. the anchors' pipeline (Chinese-LLaMA-Alpaca run_clm_pt_with_peft.py): load_dataset("text"),
     datasets.map(tokenizer) with the HF LLaMA tokenizer, then datasets.map(group_texts) into
     block_size chunks, num_proc=N, fresh cache (a first run, as a user meets it).
  3. peak memory (RSS of the pack process and its workers) packing the corpus and the corpus repeated
     R times: it should stay flat.

Same documents (non-empty lines), same token ids (the HF tokenizer is asked for BOS and EOS too), same
number of threads/processes N. Times are the best of --repeats runs, alternated, because the machine
may be shared.

With a tokenizer.json tokenizer (--tokenizer DIR holding tokenizer.json and no tokenizer.model:
SmolLM2, LLaMA-3), baseline 1 is raw `tokenizers` `encode_batch_fast` on N rayon threads
(RAYON_RS_NUM_CPUS=N, set before tokenizers starts its pool) and baseline 2 is skipped.

  python bench/pack.py                        # ../shared/data/zh, LLaMA tokenizer, N = CPUs
  python bench/pack.py --tokenizer smollm2_tokenizer_dir --skip-datasets --memory-repeat 0
  python bench/pack.py --workers 2 --repeats 3 --memory-repeat 10 --json out.json
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from zhllama import bpe, corpus
from zhllama.app.cli import main as zhllama_main

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "zh"), help="corpus dir/files (txt)")
    p.add_argument("--tokenizer", default=str(SHARED / "data" / "llama" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-repeat", type=int, default=10, help="corpus copies for the memory run (0: skip)")
    p.add_argument("--skip-datasets", action="store_true", help="skip the datasets.map baseline")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


def load_documents(paths):
    docs, nbytes = [], 0
    for p in paths:
        nbytes += os.path.getsize(p)
        with open(p, encoding="utf-8") as f:
            docs.extend(line.rstrip("\r\n") for line in f if line.strip())
    return docs, nbytes


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children: on a shared machine the
    wall clock measures the neighbours too, CPU time measures the work."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def time_raw_json(tokenizer, docs, threads):
    """Raw `tokenizers` on text in memory: one encode_batch on `threads` rayon threads, plus the
    BOS/EOS count data pack adds (ids only; no offsets)."""
    tk = bpe.load_tokenizer(tokenizer)
    tk.encode_special_tokens = True
    bos, eos = bpe.special_ids(tokenizer, tk)
    extra = (bos is not None) + 1
    encode = getattr(tk, "encode_batch_fast", tk.encode_batch)
    c, t = cpu_seconds(), time.perf_counter()
    encs = encode(docs, add_special_tokens=False)
    ids = [e.ids for e in encs]
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    return dt, cpu, sum(map(len, ids)) + extra * len(ids)


def time_raw(tokenizer, docs, threads):
    if _is_json(tokenizer):
        return time_raw_json(tokenizer, docs, threads)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    c, t = cpu_seconds(), time.perf_counter()
    ids = sp.encode(docs, add_bos=True, add_eos=True, num_threads=threads)
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    return dt, cpu, sum(map(len, ids))


def time_pack(tokenizer, inputs, workers, block_size, work):
    """The whole command, in process: tokenizer load, input hashing, workers, shards, manifest."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="pack-"))
    shutil.rmtree(out)
    c, t = cpu_seconds(), time.perf_counter()
    rc = zhllama_main(["data", "pack", "--tokenizer", tokenizer, "--input", *inputs, "--out", str(out),
                      "--workers", str(workers), "--block-size", str(block_size), "--validation-ratio", "0"])
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    if rc != 0:
        sys.exit(f"data pack failed with exit code {rc}")
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    return dt, cpu, manifest["counts"]["splits"]["train"]


def time_datasets(tokenizer, inputs, workers, block_size, work):
    """Chinese-LLaMA-Alpaca's preprocessing: datasets.map(tokenize) then datasets.map(group_texts)."""
    from itertools import chain

    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import LlamaTokenizer
    disable_progress_bar()
    tok_dir = Path(tempfile.mkdtemp(dir=work, prefix="hf-tok-"))
    shutil.copy(tokenizer, tok_dir / "tokenizer.model")
    cache = Path(tempfile.mkdtemp(dir=work, prefix="hf-cache-"))
    c, t = cpu_seconds(), time.perf_counter()
    tok = LlamaTokenizer.from_pretrained(str(tok_dir), add_bos_token=True, add_eos_token=True)

    def tokenize_function(examples):
        return tok(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated[list(examples.keys())[0]])
        if total >= block_size:
            total = (total // block_size) * block_size
        result = {k: [v[i:i + block_size] for i in range(0, total, block_size)]
                  for k, v in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    raw = load_dataset("text", data_files={"train": list(inputs)}, cache_dir=str(cache))
    raw = raw.filter(lambda x: bool(x["text"].strip()), num_proc=workers)   # same documents as ours
    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns="text")
    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    n_blocks = len(grouped["train"])
    n_tokens = sum(len(x) for x in tokenized["train"]["input_ids"])
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return dt, cpu, n_blocks, n_tokens


def peak_rss_of_pack(tokenizer, inputs, workers, block_size, work):
    """Run `data pack` as a process and sample the RSS of it and its workers every 20 ms."""
    import psutil
    out = Path(tempfile.mkdtemp(dir=work, prefix="mem-"))
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "zhllama.app.cli", "data", "pack", "--tokenizer", tokenizer,
           "--input", *inputs, "--out", str(out), "--workers", str(workers),
           "--block-size", str(block_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"total": 0, "largest": 0}
    stop = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                rss = [q.memory_info().rss for q in procs]
            except psutil.Error:
                break
            peak["total"] = max(peak["total"], sum(rss))
            peak["largest"] = max(peak["largest"], max(rss))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    t = time.perf_counter()
    th.start()
    stdout, stderr = proc.communicate()
    dt = time.perf_counter() - t
    stop.set()
    th.join()
    if proc.returncode != 0:
        sys.exit(f"data pack failed: {stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return dt, peak


def _is_json(tokenizer) -> bool:
    return bpe.is_bpe_json_base(tokenizer)


def main():
    args = parse_args()
    if _is_json(args.tokenizer):
        # the rayon pool is sized once, at its first use: N threads, like the N pack workers
        os.environ["RAYON_RS_NUM_CPUS"] = str(args.workers)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        args.skip_datasets = True
    if not Path(args.tokenizer).exists() or not Path(args.data).exists():
        sys.exit(f"needs {args.tokenizer} and {args.data} (the shared data)")
    inputs = [str(p) for p in corpus.expand_inputs([args.data])]
    docs, nbytes = load_documents(inputs)
    mb = nbytes / 1e6
    n = args.workers
    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-pack-"))
    print(f"corpus: {len(inputs)} file(s), {len(docs):,} documents, {mb:.1f} MB; tokenizer "
          f"{args.tokenizer}; N = {n} thread(s)/worker(s); block size {args.block_size}; "
          f"best of {args.repeats}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    res = {"corpus_mb": mb, "documents": len(docs), "workers": n, "block_size": args.block_size}
    try:
        raw_t, pack_t, raw_c, pack_c = [], [], [], []
        for _ in range(args.repeats):
            dt, cpu, tokens = time_raw(args.tokenizer, docs, n)
            raw_t.append(dt)
            raw_c.append(cpu)
            dt, cpu, counts = time_pack(args.tokenizer, inputs, n, args.block_size, work)
            pack_t.append(dt)
            pack_c.append(cpu)
        raw, packed = min(raw_t), min(pack_t)
        assert counts["tokens"] == tokens, (counts["tokens"], tokens)   # same work, same ids count
        ratio, cpu_ratio = raw / packed, min(raw_c) / min(pack_c)
        raw_name = "raw tokenizers encode_batch" if _is_json(args.tokenizer) else "raw sentencepiece encode   "
        print(f"{raw_name}: {raw:6.2f} s  {mb / raw:6.2f} MB/s  {tokens / raw:,.0f} tok/s"
              f"  CPU {min(raw_c):.2f} s  (wall runs: {', '.join(f'{x:.2f}' for x in raw_t)})")
        print(f"zhllama data pack          : {packed:6.2f} s  {mb / packed:6.2f} MB/s  "
              f"{tokens / packed:,.0f} tok/s  CPU {min(pack_c):.2f} s  "
              f"(wall runs: {', '.join(f'{x:.2f}' for x in pack_t)})")
        print(f"  pack speed / raw encode speed = {ratio:.2f} wall, {cpu_ratio:.2f} CPU time  "
              f"(goal >= 0.70 wall: {'met' if ratio >= 0.7 else 'NOT met'})", flush=True)
        res.update(raw_s=raw, pack_s=packed, raw_cpu_s=min(raw_c), pack_cpu_s=min(pack_c),
                   tokens=tokens, pack_over_raw=ratio, pack_over_raw_cpu=cpu_ratio,
                   blocks=counts["blocks"], dropped_tokens=counts["dropped_tokens"],
                   load_average=os.getloadavg())

        if not args.skip_datasets:
            ds_t, ds_c, ds_blocks, ds_tokens = time_datasets(args.tokenizer, inputs, n,
                                                             args.block_size, work)
            speedup = ds_t / packed
            lost = ds_tokens - ds_blocks * args.block_size
            print(f"datasets.map + group_texts : {ds_t:6.2f} s  {mb / ds_t:6.2f} MB/s  CPU {ds_c:.2f} s "
                  f"({ds_tokens:,} tokens -> {ds_blocks:,} blocks; {lost:,} tokens dropped by "
                  f"per-batch grouping vs {counts['dropped_tokens']} by data pack)")
            print(f"  pack speed / datasets pipeline speed = {speedup:.2f} wall, "
                  f"{ds_c / min(pack_c):.2f} CPU time", flush=True)
            res.update(datasets_s=ds_t, datasets_cpu_s=ds_c, pack_over_datasets=speedup,
                       pack_over_datasets_cpu=ds_c / min(pack_c), datasets_blocks=ds_blocks,
                       datasets_dropped_tokens=lost)

        if args.memory_repeat > 0:
            big = work / "big"
            big.mkdir()
            for p in inputs:                 # each file repeated R times: multi-unit files
                with open(p, "rb") as src:
                    data = src.read()
                with open(big / Path(p).name, "wb") as f:
                    for _ in range(args.memory_repeat):
                        f.write(data)
            t1, p1 = peak_rss_of_pack(args.tokenizer, inputs, n, args.block_size, work)
            tr, pr = peak_rss_of_pack(args.tokenizer, [str(big)], n, args.block_size, work)
            print(f"peak RSS, pack + workers   : 1x corpus ({mb:.0f} MB) {p1['total'] / 2**20:,.0f} MiB "
                  f"(largest process {p1['largest'] / 2**20:,.0f}) in {t1:.1f} s; "
                  f"{args.memory_repeat}x ({mb * args.memory_repeat:.0f} MB) {pr['total'] / 2**20:,.0f} MiB "
                  f"(largest {pr['largest'] / 2**20:,.0f}) in {tr:.1f} s; ratio "
                  f"{pr['total'] / p1['total']:.2f}")
            res.update(peak_rss_1x_mib=p1["total"] / 2**20, peak_rss_rx_mib=pr["total"] / 2**20,
                       memory_repeat=args.memory_repeat, pack_rx_s=tr, pack_1x_subprocess_s=t1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
