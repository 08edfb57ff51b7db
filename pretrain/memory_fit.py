"""`gradient_checkpointing: auto`: on when the planner says this run's micro batch does not fit the GPU.

Recomputing every layer's forward costs about a third more compute, so it is worth paying only where
it is needed. The decision uses the planner's own estimate (`zhllama plan`, the same formulas and the
same headroom: a run fits when its estimate is at most 90% of the GPU's memory) for the run's model,
stage, micro batch, block size and DeepSpeed config, against the memory of the GPU it runs on. Both
figures are logged. On CPU ranks checkpointing is off: there is no device memory to save.
"""

from typing import Optional, Tuple

import torch

from .plan import HEADROOM, memory_estimate

GIB = 1024 ** 3


def gpu_memory_gib(device) -> Optional[float]:
    """Total memory of the CUDA device the run uses, in GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


def choose_checkpointing(estimate_gib: dict, gpu_gib: Optional[float]) -> Tuple[bool, str]:
    """(on?, why) from the plan's {False: GiB without, True: GiB with checkpointing} and the GPU's GiB."""
    if gpu_gib is None:
        return False, "auto, CPU ranks (no device memory to save)"
    budget = HEADROOM * gpu_gib
    without, with_ = estimate_gib[False], estimate_gib[True]
    figures = (f"plan {without:.1f} GiB per GPU without it, {with_:.1f} GiB with it; "
               f"{HEADROOM:.0%} of this GPU's {gpu_gib:.1f} GiB is {budget:.1f} GiB")
    if without <= budget:
        return False, f"auto, fits without it: {figures}"
    return True, f"auto, does not fit without it: {figures}"


def decide_gradient_checkpointing(setting, *, cfg, preset, world, device, ds_path,
                                  gpu_gib: Optional[float] = None) -> Tuple[bool, str]:
    """(on?, why) for a run's `gradient_checkpointing` (true, false or auto). `gpu_gib` stands in for
    the detected GPU memory (tests); by default it is read from `device`."""
    if setting != "auto":
        return bool(setting), "set in the config"
    gpu_gib = gpu_gib if gpu_gib is not None else gpu_memory_gib(device)
    if gpu_gib is None:
        return choose_checkpointing({}, None)
    return choose_checkpointing(memory_estimate(cfg, preset, world, ds_path), gpu_gib)
