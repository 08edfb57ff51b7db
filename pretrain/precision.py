"""Numbers that must stay what they are: fp32 buffers under bf16, NaN steps never applied, JSON that is JSON.

* The rotary `inv_freq` (and `original_inv_freq`) of a LLaMA is fp32 by design: in bf16 the rotation
  angles of late positions drift by up to 0.6 rad at 512 tokens. DeepSpeed before 0.19.2 cast every
  floating buffer with the weights (upstream PR #8066), so after `deepspeed.initialize` the trainer
  asserts they are still fp32 rather than trusting the version.
* bf16 runs set DeepSpeed's `bf16.check_grad_overflow` explicitly: a step whose gradients hold a NaN
  or an inf is skipped on every rank instead of reaching the fp32 master weights (the default was off
  before DeepSpeed 0.19.3, PR #8035, and a default can change again).
* metrics.jsonl and summary.json write `null` for a non-finite number: `Infinity` and `NaN` are not
  JSON (jq and browsers refuse the line).
"""

import math
from typing import Iterable

from zhllama.errors import UserError

# Buffers that must stay float32 whatever the weights' dtype (HF LLaMA's rotary embedding).
FP32_BUFFER_NAMES = ("inv_freq", "original_inv_freq")


class PrecisionError(UserError):
    """A buffer that must stay fp32 was cast (by an old DeepSpeed or a model-wide `.to(dtype)`)."""


def wrong_dtype_buffers(module, names: Iterable[str] = FP32_BUFFER_NAMES) -> list:
    """[(qualified name, dtype)] of the buffers called one of `names` that are not float32."""
    import torch

    wanted = set(names)
    return [(name, buf.dtype) for name, buf in module.named_buffers()
            if name.rsplit(".", 1)[-1] in wanted and buf.dtype != torch.float32]


def assert_fp32_buffers(module, when: str = "after deepspeed.initialize") -> int:
    """Raise PrecisionError if a buffer of FP32_BUFFER_NAMES is not float32; else return how many there are."""
    bad = wrong_dtype_buffers(module)
    if bad:
        name, dtype = bad[0]
        raise PrecisionError(
            f"{name} is {str(dtype).replace('torch.', '')} {when} ({len(bad)} such buffer(s)); it must stay "
            "float32 (rotary positions lose precision in 16 bits). DeepSpeed before 0.19.2 casts every buffer "
            "(upstream PR #8066): install deepspeed>=0.19.8")
    return sum(1 for name, _ in module.named_buffers() if name.rsplit(".", 1)[-1] in FP32_BUFFER_NAMES)


def with_bf16_nan_safety(ds_config: dict) -> dict:
    """The DeepSpeed config with `bf16.check_grad_overflow` set to true when bf16 is on (in place)."""
    bf16 = ds_config.get("bf16") or {}
    if bf16.get("enabled"):
        bf16["check_grad_overflow"] = True
        ds_config["bf16"] = bf16
    return ds_config


def finite_or_none(x):
    """A float that JSON can hold, or None (`inf`, `nan`, and anything that is not a number)."""
    if x is None or isinstance(x, bool):
        return None if x is None else x
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def json_safe(record):
    """`record` with every non-finite float replaced by None, recursively (dicts and lists)."""
    if isinstance(record, dict):
        return {k: json_safe(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [json_safe(v) for v in record]
    if isinstance(record, float):
        return record if math.isfinite(record) else None
    return record
