"""The demo's closing report: the table of every step's figures, the loss-curve PNG, the summary files."""

import os
from pathlib import Path

from zhllama.fsutil import atomic_write_json, atomic_write_text

from .runner import say
from .settings import TRAIN_STEPS, ZH_INSTRUCTIONS


def fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def format_table(rows: list) -> str:
    """The rows as a plain-text table; an "en bits/char" column only when a row measured English."""
    head = ["stage", "zh tokens/char", "held-out loss", "bits/char", "trainable %", "tokens/s", "wall", "note"]
    english = any("en_bits_per_char" in r for r in rows)   # a real base: held-out English bits/char too

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    body = [[r["stage"], num(r["zh_tokens_per_char"], ".3f"), num(r["heldout_loss"], ".3f"),
             num(r["bits_per_char"], ".3f"), num(r["trainable_pct"], ".2f"), num(r["tokens_per_s"], ",.0f"),
             fmt_s(r["wall_s"]), r["note"]] for r in rows]
    if english:
        head.insert(4, "en bits/char")
        for line, r in zip(body, rows):
            line.insert(4, num(r.get("en_bits_per_char"), ".3f"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    out = ["  ".join(str(c).ljust(w) if i in (0, len(head) - 1) else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))).rstrip()
           for line in [head, ["-" * w for w in widths], *body]]
    return "\n".join(out)


def plot_curves(curves: dict, png: Path) -> bool:
    """One panel per training stage: training loss by step, validation loss as dots, each source's validation
    loss (`val_loss/<source>`) as squares. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("    matplotlib is not installed: no PNG (pip install matplotlib, or bash scripts/setup.sh)")
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, records) in zip(axes[0], curves.items()):
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label="train loss", lw=1.4)
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", label="held-out loss", ms=4)
        sources = sorted({k for r in records for k in r if k.startswith("val_loss/")})
        for key in sources:   # each source's validation documents, scored on their own (a mixture's zh, en...)
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            ax.plot(*zip(*points), "s:", label=f"held-out {key[len('val_loss/'):]}", ms=3)
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


def table_rows(demo) -> list:
    """One row per step: the figures the table shows (summary.json keeps them too)."""
    f, ev = demo.figures, demo.figures["eval"]["per_stage"]
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
    row("vocab-train", wall=f["vocab-train"]["wall_s"], note=f"{demo.settings['vocab-train']['vocab_size']:,} "
        "Chinese pieces")
    row("vocab-merge", merge["merged_zh_tokens_per_char"], wall=merge["wall_s"],
        note=f"{merge['base_vocab']:,} -> {merge['merged_vocab']:,} pieces")
    row("resize", merge["merged_zh_tokens_per_char"], ev["resize"], 0.0, wall=f["resize"]["wall_s"],
        note=f"{demo.settings['resize']['init']} init, untrained")
    row("pack", wall=f["pack"]["wall_s"], note=f"{f['pack']['splits'].get('train', {}).get('blocks', '?')} "
        f"train blocks")
    for step in TRAIN_STEPS:
        t = f[step]
        row(step, merge["merged_zh_tokens_per_char"], ev[step], t.get("trainable_pct"), t["tokens_per_s"],
            t["wall_s"], f"{t['steps']} steps, {t.get('world_size')} rank(s)")
    merged = demo.figures["eval"].get("zhllama_eval")   # `zhllama eval` on the merged checkpoint
    if merged and "en_bits_per_char" in ev.get("sft", {}):
        merged = {**merged, "en_bits_per_char": demo.figures["eval"].get("merged_en_bits_per_char")}
    row("merge", merge["merged_zh_tokens_per_char"] if merged else None, merged, tps=(merged or {}).get(
        "tokens_per_s"), wall=f["merge"]["wall_s"], note="one HF checkpoint")
    row("generate", wall=f["generate"]["wall_s"], note="answer under the table")
    row("eval", wall=f["eval"]["wall_s"], note="held-out figures, PNG")
    return rows


def summarise(demo, total_s: float, reused: list) -> dict:
    """Print the closing report (the table, the generated answers, where everything is) and write
    DIR/summary.json and DIR/summary.md."""
    rows = table_rows(demo)
    table = format_table(rows)
    ev = demo.figures["eval"]
    steps_s = sum(demo.figures[s]["wall_s"] for s in demo.steps)
    if len(reused) == len(demo.steps):
        done = (f"zhllama demo: nothing to do, all {len(demo.steps)} steps were done earlier "
                f"(they took {fmt_s(steps_s)} in all)")
    else:
        done = (f"zhllama demo: all {len(demo.steps)} steps done; this run took {fmt_s(total_s)}"
                + (f", reusing {len(reused)} finished step(s): {', '.join(reused)}" if reused else ""))
    load = f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs now)" if hasattr(os, "getloadavg") else ""
    # what the eval step scored: every held-out document, or the first `max_heldout_docs` (a real base)
    held = demo.figures["data"]["zh_heldout_docs"]
    scored = demo.figures["eval"]["per_stage"]["base"]
    n_scored, scored_chars = scored.get("documents", held), scored.get("chars", demo.figures["data"]["zh_heldout_chars"])
    scored_docs = f"{n_scored} of {held}" if n_scored < held else str(held)
    lines = ["", done + load,
             "Held-out Chinese text: "
             f"{scored_docs} documents, {scored_chars:,} characters, never trained on. Loss is nats per "
             "token of each stage's own tokenizer; bits per character compares across tokenizers.", "",
             table, ""]
    gen = demo.figures["generate"]
    if ev.get("zhllama_eval"):
        merged, sft = ev["zhllama_eval"]["bits_per_char"], ev["per_stage"]["sft"]["bits_per_char"]
        same = abs(merged - sft) <= 1e-3 * sft
        lines += [f"zhllama eval on the merged checkpoint: {merged:.3f} bits/char ("
                  + ("the sft row's figure: the merged weights compute what base + adapters computed)" if same
                     else f"the sft row says {sft:.3f}: the merge changed the model, check it)")]
    if "generated" in gen:
        lines += [f"zhllama generate: {gen['instruction']} -> {gen['generated'][:200] or '(nothing: it ended at once)'}",
                  "  (a tiny model after a few dozen steps: expect fragments of Chinese, not an answer)"
                  if demo.base is None else "  (a short run on 2 CPU cores: a first step, not a finished model)"]
    for i, q in enumerate(ZH_INSTRUCTIONS if "answers" in gen else ()):
        lines += [f"instruction {i + 1}: {q}"] + [
            f"  {name:<5} {(gen['answers'][name][i] if i < len(gen['answers'][name]) else '')[:200]!r}"
            for name in ("base", "final")]
    lines.append("")
    lines += ["Where everything is:",
              f"  base model          {demo.base_model()}",
              f"  Chinese pieces      {demo.figures['vocab-train']['zh_sp']}",
              f"  merged tokenizer    {demo.tokenizer()}",
              f"  resized model       {demo.resized()}",
              f"  packed data         {demo.figures['pack']['packed']}"]
    for step in TRAIN_STEPS:
        lines.append(f"  {step:<7} run         {demo.figures[step]['run']}  (metrics.jsonl, final/, logs in "
                     f"{demo.dir(step) / 'logs'})")
    if demo.figures["merge"].get("model"):
        lines.append(f"  merged checkpoint   {demo.figures['merge']['model']}")
    if ev.get("png"):
        lines.append(f"  loss curves (PNG)   {ev['png']}")
    else:
        lines.append("  loss curves (PNG)   not drawn: matplotlib is not installed (pip install matplotlib)")
    lines.append(f"  this summary        {demo.out / 'summary.md'} and summary.json")
    lines.append("Run it again to reuse every step; --force STEP redoes from STEP.")
    text = "\n".join(lines)
    say(text)
    summary = {"total_s": total_s, "steps_s": steps_s, "reused": reused, "rows": rows,
               "figures": demo.figures}
    atomic_write_json(demo.out / "summary.json", summary)
    atomic_write_text(demo.out / "summary.md", "```\n" + table + "\n```\n")
    return summary
