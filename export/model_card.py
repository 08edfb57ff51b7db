"""The README.md model card of a merged checkpoint: what it can honestly state, from the files.

Everything comes from what the merge read: each adapter's `zhllama_adapter.json` (stage, trained
modules, run config), the stage presets for the hyperparameters a run left at their defaults, the
packed data's manifest (sources and token counts), and the tokenizer itself (size, and tokens per
character on zhllama's bundled samples against the base tokenizer). Nothing is guessed: a figure that
is not in the files is written as "not recorded".
"""

import json
import time
from pathlib import Path

import zhllama
from zhllama.fsutil import atomic_write_text
from zhllama.log import get_logger
from zhllama.modelio import load_tokenizer
from zhllama.pretrain.presets import OVERRIDE_KEYS, STAGES
from zhllama.pretrain.rope import Rope
from zhllama.textenc import encode_text

log = get_logger("zhllama.merge")

HYPER = OVERRIDE_KEYS  # the hyperparameters a run config may take from its stage preset


def _samples_dir() -> Path:
    return Path(zhllama.__file__).resolve().parent / "data"


def _hyperparameters(stage: str, run_config: dict) -> dict:
    """The run's values; keys it left unset (null) take the stage preset, marked as such."""

    preset = STAGES.get(stage)
    out = {}
    for key in HYPER:
        value = run_config.get(key)
        if value is None and preset is not None and hasattr(preset, key):
            value = getattr(preset, key)
            if value is None or value == ():
                continue
            value = f"{list(value) if isinstance(value, tuple) else value} (preset)"
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    for key in ("max_steps", "epochs", "precision", "seed", "template", "new_rows_only", "rope_scaling",
                "context_length"):
        if run_config.get(key) not in (None, False, {}):
            out[key] = run_config[key]
    return out


def _data_lines(run_config: dict) -> list:
    lines = []
    for d in run_config.get("data") or []:
        path = Path(str(d).split(":")[0])
        manifest = path / "manifest.json"
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text(encoding="utf-8"))
                srcs = ", ".join(f"`{Path(s['path']).name}` ({s['size']:,} bytes)" for s in m.get("sources", []))
                train = (m.get("counts", {}).get("splits", {}).get("train") or {})
                lines.append(f"`{d}`: packed from {srcs or 'unrecorded sources'}; {train.get('tokens', 0):,} "
                             f"training tokens in blocks of {m.get('block_size')}")
                continue
            except (ValueError, KeyError, TypeError):
                pass
        lines.append(f"`{d}`")
    return lines


def _tokens_per_char(tok_path, text: str):
    tok = load_tokenizer(tok_path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    n_tokens = sum(len(encode_text(tok, ln)) for ln in lines)
    return n_tokens / max(1, sum(len(ln) for ln in lines))


def _tokenizer_section(report: dict, base_tokenizer) -> list:
    n, rows = report["tokenizer_size"], report["vocab_size"]
    lines = [f"- vocabulary: {n:,} tokens, {rows:,} embedding rows"
             + (f" ({rows - n} padding rows the tokenizer never produces)" if rows > n else ""),
             f"- base checkpoint: {report['base_vocab_size']:,} rows"]
    merge_report = Path(report["tokenizer"]) / "merge_report.json"
    if merge_report.is_file():
        try:
            m = json.loads(merge_report.read_text(encoding="utf-8"))
            lines.append(f"- built by `zhllama vocab merge` ({m.get('mode')}): {m['base']['pieces']:,} base pieces + "
                         f"{m['counts']['added']:,} added = {m['final_size']:,}")
        except (ValueError, KeyError, TypeError):
            pass
    samples = _samples_dir()
    rows_out = []
    for name, label in (("zh_sample.txt", "Chinese"), ("en_sample.txt", "English")):
        f = samples / name
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        try:
            ours = _tokens_per_char(report["tokenizer"], text)
            base = _tokens_per_char(base_tokenizer, text) if base_tokenizer is not None else None
        except Exception as e:  # a figure for the card, never a reason to fail the merge
            log.warning("tokenizer figures skipped: %s", e)
            return lines
        rows_out.append(f"| {label} (`{name}`, {len(text):,} characters) | {ours:.3f} | "
                        f"{'n/a' if base is None else f'{base:.3f}'} |")
    if rows_out:
        lines += ["", "Tokens per character on zhllama's bundled samples (lower is better):", "",
                  "| text | this tokenizer | base checkpoint's tokenizer |", "| --- | --- | --- |", *rows_out]
    return lines


def render_model_card(report: dict, adapters, base_dir, base_tokenizer=None) -> str:
    name = Path(report.get("out", "")).name or "merged model"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "language:", "- zh", "- en",
             "license: other", "tags:", "- llama", "- chinese", "- zhllama", "---", ""]
    body = [f"# {name}", "",
            f"A full Hugging Face checkpoint merged by `zhllama merge` on {time.strftime('%Y-%m-%d')}: the base "
            f"`{base_dir}` with {len(adapters)} adapter(s) folded into its weights, in this order. It loads with "
            "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` from this directory alone.",
            "", "## How it was made", ""]
    for i, (ad, rec) in enumerate(zip(adapters, report["adapters"]), 1):
        meta = ad.meta or {}
        run = meta.get("run_config") or {}
        body.append(f"### {i}. {rec['stage']} (`{ad.path}`)")
        body.append("")
        what = []
        if rec["lora_targets"]:
            what.append(f"LoRA on {', '.join(rec['lora_targets'])} (scale alpha/r = {rec['scale']:g})")
        if rec["replaces"]:
            what.append("full " + ", ".join(n.rsplit(".", 2)[-2] for n in rec["replaces"]))
        if rec["trained_rows"]:
            what.append(f"{rec['trained_rows']:,} rows of embed_tokens (TrainableTokens)")
        body.append(f"- trained: {'; '.join(what)}")
        body.append(f"- adapter weights sha256: `{rec['sha256']}`")
        body.append(f"- trained on base: `{meta.get('base_model') or 'not recorded'}`"
                    + (f", after merging {', '.join(f'`{a}`' for a in run['init_adapters'])}"
                       if run.get("init_adapters") else ""))
        data = _data_lines(run)
        body.append("- data: " + ("; ".join(data) if data else "not recorded"))
        hp = _hyperparameters(rec["stage"], run) if run else {}
        body.append("- hyperparameters: " + (", ".join(f"{k}={v}" for k, v in hp.items()) if hp else "not recorded"))
        if rec["rows_out"] != rec["rows_in"]:
            body.append(f"- vocabulary grown from {rec['rows_in']:,} to {rec['rows_out']:,} rows by this adapter's "
                        "embed_tokens and lm_head")
        versions = meta.get("versions")
        if versions:
            body.append("- trained with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        body.append("")
    body += ["## Tokenizer", "", *_tokenizer_section(report, base_tokenizer), ""]
    cfg = report.get("config") or {}
    body += ["## Checkpoint", "",
             f"- weights: {report['dtype']}, {len(report['shards_out'])} safetensors shard(s); "
             f"{cfg.get('num_hidden_layers')} layers, hidden size {cfg.get('hidden_size')}, "
             + (_context_line(report["rope"]) if report.get("rope") else f"context {cfg.get('max_position_embeddings')}"),
             "- `SHA256SUMS` lists every file; check a download with `sha256sum -c SHA256SUMS`",
             "- `zhllama_merge.json` records the merge (inputs, their sha256, the dtype, peak memory)", "",
             *_chat_section(report),
             "## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(\"PATH\")",
             "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
             "```", "",
             "With the SFT prompt template it was trained on: `zhllama generate --model PATH --template "
             f"{_template(adapters)} --prompt \"...\"`; perplexity: `zhllama eval --model PATH --text FILE`.", "",
             "## Licence", "",
             "These weights are a derivative of the base model and carry its licence: for LLaMA, Meta's licence "
             "(LLaMA-1: non-commercial research use; request access from Meta), which also governs redistribution "
             "of this merged checkpoint. The training data keep their own terms. zhllama's code is Apache-2.0; that "
             "does not change the licence of the weights. Check both before publishing.", ""]
    return "\n".join(front + body)


def _context_line(rope: dict) -> str:
    """The checkpoint's context when a long-context stage changed its RoPE settings (report["rope"])."""
    before, after = Rope.from_dict(rope["from"]), Rope.from_dict(rope["to"])
    return (f"context {after.describe()}, extended from the base's {before.describe()}; the scaling is in "
            "config.json (`rope_scaling`, `rope_parameters`), read by transformers, vLLM and llama.cpp's converter")


def _chat_section(report: dict) -> list:
    chat = report.get("chat_template")
    if not chat:
        return ["## Chat template", "",
                f"None: {report.get('chat_template_note') or 'no SFT adapter'}. Prompt it with plain text.", ""]
    seam = ("the reply follows the prompt text directly" if chat["response_seam"] == "continue" else
            "the reply is tokenized as a new SentencePiece sequence after the prompt")
    return ["## Chat template", "",
            f"The SFT template `{chat['name']}` ({chat['source']}), written as `chat_template.jinja` and as "
            "`chat_template` in tokenizer_config.json, so `tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)`, vLLM's OpenAI server and llama.cpp (`--jinja`, GGUF converted from "
            f"this dir) prompt it exactly as it was trained ({seam}). Messages: an optional system message, "
            "then user/assistant turns; Alpaca's input goes in an `input` key of the first user message, or "
            "after the instruction on a new line. See docs/deploy.md in zhllama.", ""]


def _template(adapters) -> str:
    for ad in reversed(adapters):
        run = (ad.meta or {}).get("run_config") or {}
        if run.get("stage") == "sft" and run.get("template"):
            return str(run["template"])
    return "alpaca"


def write_model_card(out_dir, report, adapters, base_dir, base_tokenizer=None) -> None:
    atomic_write_text(Path(out_dir) / "README.md", render_model_card(report, adapters, base_dir, base_tokenizer))
