"""`zhllama ...` with the engine's fp16 path allowed on CPU ranks (tests/test_defaults.py runs it).

Two gates keep fp16 off a CPU, both by design: `choose_precision` refuses `precision=fp16` without a GPU,
and DeepSpeed's CPU accelerator declares fp16 unsupported where oneDNN has no fp16 kernels (this
container's CPU). torch computes fp16 on CPU all the same (slowly), so with the two gates opened here the
rest is the real run: the model loaded in fp16, `build_ds_config`'s fp16 section from ds_configs/,
DeepSpeed's ZeRO-2 fp16 optimizer with its dynamic loss scaler and overflow check, and the engine's
counting of skipped steps. Not covered: CUDA's fp16 kernels and NCCL, and `choose_precision` itself
(tests/test_engine_step.py covers it).
"""

import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

from zhllama.app.cli import main
from zhllama.pretrain import engine

CPU_Accelerator.is_fp16_supported = lambda self: True
_choose = engine.choose_precision
engine.choose_precision = lambda requested, device: "fp16" if requested == "fp16" else _choose(requested, device)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
