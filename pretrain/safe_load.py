"""Reading DeepSpeed's checkpoint files without running code from them.

`torch.load(weights_only=True)` with an allowlist of DeepSpeed's own plain classes (its ZeRO stage enum,
loss scalers and fragment addresses): tensors, containers and those classes load; anything else (a
planted pickle that would run a command) is refused with one line naming the file. The resume path
(`checkpoint.load`, `reshard.SavedShards`) reads every `engine/*.pt` through this.
"""

import contextlib
import enum
import pickle

import torch

from zhllama.errors import UserError


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's own plain classes that its checkpoint files hold (besides tensors and containers)."""
    found = []
    for module, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def _enum_lookup(allowed_enums: tuple):
    """`builtins.getattr` as some Python 3.11 releases (3.11.0-3.11.?, e.g. Debian 12's 3.11.2) pickle an
    enum member: `getattr(ZeroStageEnum, "gradients")`. Allowed only as a member lookup on DeepSpeed's
    own enums; any other class or attribute is refused, so the name grants no general getattr."""
    def getattr_member(cls, name):
        if cls in allowed_enums and isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r}) "
                                     "is not a member of an allowed enum")
    return getattr_member


def safe_torch_load(path, map_location=None, mmap: bool = False):
    """torch.load without code execution: weights_only=True, DeepSpeed's plain classes allowed.

    `mmap=True` maps the tensors of a zip-format file instead of reading them (a rank that needs a slice
    of another rank's optimizer state reads only those pages)."""
    allowed = _deepspeed_safe_globals()
    enums = tuple(c for c in allowed if isinstance(c, type) and issubclass(c, enum.Enum))
    allowed = [*allowed, (_enum_lookup(enums), "builtins.getattr")]
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only the global list
    if scoped is None and hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(allowed)
    try:
        with scoped(allowed) if scoped is not None else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refusing to load a checkpoint file that holds more than tensors and plain "
                        f"data ({reason[:200]})") from None
