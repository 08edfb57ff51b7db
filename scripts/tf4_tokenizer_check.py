"""Load a tokenizer dir with an older transformers (run by that venv's python) and compare it with
sentencepiece: `python scripts/tf4_tokenizer_check.py DIR LINES.txt [N] [CHAT.json]`, prints JSON.

Needs only transformers, tokenizers, sentencepiece, protobuf (and jinja2 for CHAT): no torch, no zhllama,
so it runs in the small venv scripts/setup.sh makes (.venv-tf4). CHAT.json holds
[{"messages": [...], "ids": [...]}, ...]: the ids `apply_chat_template(..., add_generation_prompt=True)`
must give (the training prompt ids, computed by zhllama in the main venv).
"""

import json
import sys
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import AutoTokenizer


def main(argv):
    tok_dir, lines_file = Path(argv[0]), Path(argv[1])
    n = int(argv[2]) if len(argv) > 2 else 200
    lines = [s for s in lines_file.read_text(encoding="utf-8").splitlines() if s.strip()][:n]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    hf = tok(lines, add_special_tokens=False)["input_ids"]
    want = sp.encode(lines)
    differ = [i for i, (a, b) in enumerate(zip(hf, want)) if list(a) != list(b)]
    out = {"transformers": transformers.__version__, "class": type(tok).__name__, "lines": len(lines),
           "differ": len(differ), "first_differ": lines[differ[0]] if differ else None,
           "bos_ok": tok(lines[0])["input_ids"] == [sp.bos_id()] + want[0],
           "specials": [tok.bos_token, tok.eos_token, tok.unk_token],
           "special_ids": [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id], "len": len(tok)}
    if len(argv) > 3:
        cases = json.loads(Path(argv[3]).read_text(encoding="utf-8"))
        ok = 0
        for case in cases:
            text = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
            ok += tok(text, add_special_tokens=False)["input_ids"] == case["ids"]
        out["chat_cases"], out["chat_ok"] = len(cases), ok
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
