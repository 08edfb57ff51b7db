"""The library versions zhllama is tested on: checked when a training run starts, recorded in its outputs.

A floor here is what the test suite runs on (pyproject.toml holds the same numbers; a test checks that
they agree), not merely the oldest release that imports, because older releases of these libraries
train wrongly without failing:

* DeepSpeed before 0.19.2 casts every floating buffer of the module to bf16, the rotary `inv_freq`
  included (positions shifted by up to 0.6 rad at 512; upstream PR #8066); before 0.19.3 a non-finite
  bf16 gradient was not treated as an overflow by default (PR #8035) and ZeRO-1/2 with `overlap_comm`
  could reduce a bucket before all its producer streams finished (PR #8080). 0.19.8 is what is tested.
* PEFT: stage 1 is `TrainableTokens`, whose weight tying (PR #2870) and untied-config handling
  (PR #3126) arrived in 0.19 and whose merge of several trainable-token adapters was fixed after 0.20
  (PR #3514); 0.21 is what is tested.

Only the standard library here: `zhllama train --help` and the launchers' checks stay light.
"""

import platform
from importlib import metadata
from typing import Dict, Optional

from packaging.version import InvalidVersion, Version

from .errors import UserError

# package -> (floor, why; the why ends the refusal line)
FLOORS: Dict[str, tuple] = {
    "deepspeed": ("0.19.8", "older releases cast the rotary inv_freq to bf16 (PR #8066) and apply NaN bf16 "
                            "steps (PR #8035); 0.19.8 is tested"),
    "peft": ("0.21", "stage 1's TrainableTokens with tied embeddings (PRs #2870, #3126, #3514); 0.21 is tested"),
    "transformers": ("5.0", "zhllama runs on transformers 5; its files also load in 4.40"),
}
# Recorded in every run (its first lines and summary.json), whether or not it has a floor.
RECORDED = ("torch", "transformers", "peft", "deepspeed", "accelerate", "tokenizers", "sentencepiece", "zhllama")


class VersionError(UserError):
    """An installed library is older than the version zhllama is tested on."""


def installed(package: str) -> Optional[str]:
    """The installed version of `package`, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _older(found: str, floor: str) -> bool:
    try:
        return Version(found).release < Version(floor).release
    except InvalidVersion:
        return True


def check_versions(floors: Dict[str, tuple] = FLOORS) -> None:
    """Raise VersionError, one line naming the package, the version found and the one needed."""
    for package, (floor, why) in floors.items():
        found = installed(package)
        if found is None or _older(found, floor):
            raise VersionError(f"{package} {found or '(not installed)'} is installed; zhllama needs "
                               f"{package}>={floor}: {why}. Upgrade it: pip install '{package}>={floor}'")


def versions_record() -> Dict[str, Optional[str]]:
    """{package: version or None} for the run's log and summary.json, with the Python version."""
    record = {"python": platform.python_version()}
    record.update({p: installed(p) for p in RECORDED})
    return record


def versions_line(record: Dict[str, Optional[str]]) -> str:
    return " | ".join(f"{k} {v}" for k, v in record.items() if v is not None)
