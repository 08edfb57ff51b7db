"""SFT end to end: 2 CPU ranks under deepspeed (launch/sft.sh), then `zhllama merge` and `zhllama generate`.

A tiny model memorises a handful of Chinese instruction records. If the template, the label mask or
the EOS were wrong anywhere between training and inference, greedy generation from the same prompt
would not give back the trained response and stop.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, subprocess_env
from zhllama.sft.templates import get_template

REPO = Path(__file__).resolve().parent.parent
STEPS = 80


def _records():
    """8 short records of the bundled set (the prompts go to `zhllama generate --prompt`, so no input), written
    under BELLE's field names so the run's `field_map` is exercised; the same records on every machine."""
    rows = [json.loads(line) for line in (REPO / "zhllama" / "data" / "sft_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if not r["input"]]
    rows.sort(key=lambda r: len(r["output"]))
    return [{"question": r["instruction"], "std_answer": r["output"]} for r in rows[4:12]]


@pytest.mark.slow
def test_sft_two_ranks_then_merge_and_generate_reproduces_trained_responses(tmp_path, tiny_model_dir):
    rows = _records()
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "sft_run"
    env = subprocess_env(GPUS_PER_NODE=2, MASTER_PORT=free_port(), LOG_DIR=tmp_path / "logs")
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "sft.sh"), f"model={tiny_model_dir}", f"data=[{data}]", "init_adapters=[]",
         "field_map={question: instruction, std_answer: output}", "template=chinese-alpaca", f"out={run}", "global_batch=8", "micro_batch=2",
         "block_size=128", f"max_steps={STEPS}", "lr=0.01", "warmup_ratio=0.0", "lora_dropout=0.0",
         "save_every=1000", "log_every=20", "tensorboard=false"],
        env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert (run / "final" / "adapter_model.safetensors").stat().st_size > 100_000

    merged = tmp_path / "merged"
    py = [sys.executable, "-m", "zhllama.app.cli"]
    res = subprocess.run([*py, "merge", "--base", tiny_model_dir, "--adapter", run / "final", "--out", merged],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the run recorded its template, and the merged model ships it as its chat template
    spec = get_template("chinese-alpaca").to_dict()
    assert json.loads((run / "template.json").read_text(encoding="utf-8")) == spec
    assert json.loads((run / "final" / "zhllama_adapter.json").read_text(encoding="utf-8"))["run_config"]["template_spec"] == spec
    assert (merged / "chat_template.jinja").read_text(encoding="utf-8") == get_template("chinese-alpaca").chat_template()

    instruction_key, output_key = "question", "std_answer"
    cmd = [*py, "generate", "--model", merged, "--template", "chinese-alpaca", "--greedy", "--max-new-tokens", "64",
           "--json"] + [x for r in rows for x in ("--prompt", r[instruction_key])]
    res = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    outs = {rec["prompt"]: rec for rec in map(json.loads, filter(lambda ln: ln.startswith("{"), res.stdout.splitlines()))}
    detail = [(r[output_key], outs[r[instruction_key]]["response"], outs[r[instruction_key]]["finish_reason"])
              for r in rows]
    exact = [d for d in detail if d[1].strip() == d[0].strip() and d[2] == "stop"]
    assert len(exact) >= 6, detail
