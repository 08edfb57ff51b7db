"""Which init for the new rows of a *tied* model (one matrix for embed_tokens and lm_head)?

Resizes a real tied model (SmolLM2-135M-Instruct, read from a GGUF file with transformers + gguf) to a
Chinese-extended byte-level BPE tokenizer (`vocab train --base` + `vocab merge`) with --init
subword-mean, mean and random, and prints the held-out Chinese loss right after resize, in bits per
character (comparable across tokenizers), next to the base model with its own tokenizer.

  python bench/resize_tied.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --merged merged_tok \\
      --text heldout_zh.txt [--lines 200]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

from zhllama.vocab import resize

REPO = Path(__file__).resolve().parent.parent


def bits_per_char(model, tok, lines, max_tokens=256):
    import torch
    nll, chars = 0.0, 0
    with torch.no_grad():
        for text in lines:
            ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            out = model(x, labels=x)
            nll += out.loss.item() * (len(ids) - 1)
            chars += len(tok.decode(ids[1:]))
    return nll / math.log(2) / chars


def save_plain(model, out_dir):
    """A GGUF-loaded model refuses save_pretrained (marked quantized; its weights are dequantized
    float32 by now): write its state dict and config as a plain checkpoint, without the tied lm_head."""
    import json
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True)
    tied = model.config.tie_word_embeddings
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out_dir))
    cfg_file = out_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("quantization_config", None)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--merged", required=True, help="the merged tokenizer directory")
    p.add_argument("--text", required=True, help="held-out Chinese text, one document a line")
    p.add_argument("--lines", type=int, default=200)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = [t for t in Path(args.text).read_text(encoding="utf-8").splitlines() if t.strip()][:args.lines]
    work = Path(tempfile.mkdtemp(prefix="zhllama-resize-tied-"))
    g = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name)
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    base_dir = work / "base"
    save_plain(model, base_dir)
    tok.save_pretrained(str(base_dir))
    print(f"{g.name}: tie_word_embeddings={model.config.tie_word_embeddings}, vocab {model.config.vocab_size}; "
          f"{len(lines)} held-out lines", flush=True)
    print(f"base (own tokenizer): {bits_per_char(model.eval(), tok, lines):.3f} bits/char", flush=True)
    merged_tok = AutoTokenizer.from_pretrained(args.merged)
    for init in ("subword-mean", "mean", "random"):
        t = time.perf_counter()
        out = work / init
        resize.resize_checkpoint(base_dir, args.merged, out, init=init)
        m = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        print(f"resized, --init {init:12s}: {bits_per_char(m, merged_tok, lines):.3f} bits/char "
              f"({time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
