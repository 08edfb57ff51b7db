"""Tensor dtypes by their three spellings, in one table so every stage spells them the same way.

* zhllama's short names, `bf16`, `fp16`, `fp32`: `zhllama merge --dtype`, the training `precision`;
* torch's names, `bfloat16`, `float16`, `float32`: `--dtype` of generate/eval/serve, `config.json`;
* safetensors' codes, `BF16`, `F16`, `F32` (and the integer ones): shard headers.

torch is imported only inside `torch_dtype`, so light commands that read this table stay light.
"""

# short name -> (torch name, safetensors code), for the floating-point dtypes a checkpoint is saved in
FLOATS = {"bf16": ("bfloat16", "BF16"), "fp16": ("float16", "F16"), "fp32": ("float32", "F32")}
SHORT_NAMES = tuple(FLOATS)                                  # ("bf16", "fp16", "fp32")
TORCH_NAMES = tuple(torch for torch, _ in FLOATS.values())   # ("bfloat16", "float16", "float32")

# safetensors code -> (torch name, bytes per element): the dtypes a checkpoint's header may name
SAFETENSORS = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
               "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
               "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
               "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
               "BOOL": ("bool", 1)}
FLOAT_CODES = ("BF16", "F16", "F32", "F64")                  # the codes that a --dtype cast applies to


def torch_name(name: str) -> str:
    """`bfloat16` for `bf16` (a torch name is returned as it is); KeyError for anything else."""
    return name if name in TORCH_NAMES else FLOATS[name][0]


def torch_dtype(name: str):
    """The torch dtype for a short name (`bf16`) or a torch name (`bfloat16`)."""
    import torch

    return getattr(torch, torch_name(name))


def st_code(dtype) -> str:
    """The safetensors code of a short name (`bf16`), a torch name or a torch dtype (`torch.bfloat16`)."""
    name = str(dtype).replace("torch.", "")
    if name in FLOATS:
        return FLOATS[name][1]
    for code, (torch_, _) in SAFETENSORS.items():
        if torch_ == name:
            return code
    raise ValueError(f"no safetensors dtype for {dtype}")


def short_name(code: str, default: str = "fp32") -> str:
    """The short name of a safetensors float code (`BF16` -> `bf16`); `default` for the others."""
    for short, (_, c) in FLOATS.items():
        if c == code:
            return short
    return default
