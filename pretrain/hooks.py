"""Test hooks of the training loop: points where a test makes a run crash or diverge on purpose.

The trainer takes a `TrainHooks` (default: none set, nothing happens) and calls it at fixed points; it
never reads the environment for them. Tests in-process pass their own hooks. The crash/resume tests run
the real launcher in subprocesses and cannot, so `hooks_from_env` is the one test seam that turns
environment variables into hooks, read once when `zhllama train` starts:

  ZHLLAMA_CRASH=after-step:K | in-checkpoint:K   SIGKILL rank 0 after step K / inside checkpoint K's write
  ZHLLAMA_NAN_STEPS=3,4                            a NaN loss on rank 0 at these (1-based) steps
  ZHLLAMA_NAN_WEIGHTS=K                            rank 0's trainable weights become NaN after step K (as if
                                                   a non-finite update had been applied), before its checkpoint
"""

import os
import signal
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

CRASH_ENV = "ZHLLAMA_CRASH"
NAN_STEPS_ENV = "ZHLLAMA_NAN_STEPS"
NAN_WEIGHTS_ENV = "ZHLLAMA_NAN_WEIGHTS"

StepHook = Callable[[int, int], None]  # (1-based step, rank)


@dataclass(frozen=True)
class TrainHooks:
    after_step: Optional[StepHook] = None  # after step K's metrics and checkpoint
    in_checkpoint: Optional[StepHook] = None  # checkpoint K's files written, before it is made complete
    poison_loss: Optional[Callable[[int, int], bool]] = None  # True: this step's micro-batch losses become NaN
    poison_weights: Optional[Callable[[int, int], bool]] = None  # True: the trainable weights become NaN after step K

    def call_after_step(self, step: int, rank: int) -> None:
        if self.after_step is not None:
            self.after_step(step, rank)

    def call_in_checkpoint(self, step: int, rank: int) -> None:
        if self.in_checkpoint is not None:
            self.in_checkpoint(step, rank)

    def poisons(self, step: int, rank: int) -> bool:
        return self.poison_loss is not None and self.poison_loss(step, rank)

    def poisons_weights(self, step: int, rank: int) -> bool:
        return self.poison_weights is not None and self.poison_weights(step, rank)


def _sigkill_rank0_at(step_wanted: int) -> StepHook:
    def hook(step: int, rank: int) -> None:
        if rank == 0 and step == step_wanted:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def hooks_from_env(environ: Mapping[str, str] = os.environ) -> TrainHooks:
    """The test seam: ZHLLAMA_CRASH, ZHLLAMA_NAN_STEPS and ZHLLAMA_NAN_WEIGHTS (see the module docstring) as hooks.

    A value that does not parse sets no hook: these variables are for the test suite, not for users."""
    hooks = {}
    kind, _, step = environ.get(CRASH_ENV, "").partition(":")
    if kind in ("after-step", "in-checkpoint") and step.isdigit():
        hooks["after_step" if kind == "after-step" else "in_checkpoint"] = _sigkill_rank0_at(int(step))
    nan_steps = {int(s) for s in environ.get(NAN_STEPS_ENV, "").split(",") if s.strip().isdigit()}
    if nan_steps:
        hooks["poison_loss"] = lambda step, rank: rank == 0 and step in nan_steps
    nan_weights = environ.get(NAN_WEIGHTS_ENV, "").strip()
    if nan_weights.isdigit():
        hooks["poison_weights"] = lambda step, rank: rank == 0 and step == int(nan_weights)
    return TrainHooks(**hooks)
