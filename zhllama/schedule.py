"""The learning-rate schedule of every training loop: linear warmup, then cosine decay.

The engine's stages and the tiny base the demo pretrains share it, so a warmup or a floor means the
same thing everywhere. Plain arithmetic (no torch): `torch.optim.lr_scheduler.LambdaLR` takes `f`.
"""

import math


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then cosine down to min_lr_ratio x peak."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
