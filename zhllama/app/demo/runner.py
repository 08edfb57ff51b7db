"""Running what a user types: `zhllama SUBCOMMAND ...` and the training launchers, in subprocesses.

Each command's output is shown indented under the demo's own lines; a command that fails stops the
demo with one line. Figures are read from the files the commands write (a training run's
summary.json and metrics.jsonl), never parsed from what they print.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import zhllama.configs
from zhllama.errors import UserError
from zhllama.hosts import free_port

from .settings import LAUNCHERS, REPO

# The environment a step's subprocess gets rid of: a demo started inside another launcher's world
# must not hand that world's rank, rendezvous or launcher settings to its own commands.
_INHERITED_WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                    "HOSTFILE", "DETACH", "CONFIG", "GPUS_PER_NODE")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def short(arg) -> str:
    """An argument as a user would type it: absolute paths under the working directory made relative."""
    return str(arg).replace(os.getcwd() + os.sep, "")


def read_json(path: Path):
    """A JSON file's object, or None when it is missing or unreadable (an unfinished step's file)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def on_cpu() -> bool:
    """True when the commands run on CPU: DS_ACCELERATOR=cpu, or no CUDA device."""
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def command_env(**extra) -> dict:
    """This process's environment for a subcommand: offline, unbuffered, no inherited world."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if on_cpu():
        env["DS_ACCELERATOR"] = "cpu"
    for k in _INHERITED_WORLD:
        env.pop(k, None)
    env.update(extra)
    return env


def config_file(step: str) -> Path:
    """configs/<stage>.yaml as installed (the repository's configs/ in an editable install)."""
    return Path(zhllama.configs.__file__).parent / f"{step}.yaml"


def zhllama_command(args, capture: bool = False) -> str:
    """Run `zhllama ARGS` in a subprocess (what a user types); stop the demo if it fails.

    Its stderr (progress, errors) is echoed indented; with `capture` its stdout is returned."""
    args = [str(a) for a in args]
    say("    $ zhllama " + " ".join(short(a) for a in args))
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", *args], env=command_env(),
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
    for line in (res.stderr or "").splitlines():
        say("      " + line)
    if res.returncode != 0:
        raise UserError(f"step failed: zhllama {' '.join(args[:2])} exited with {res.returncode}")
    return res.stdout or ""


def stream(cmd, env) -> int:
    """Run a training command, echo its zhllama log lines once each (every rank logs the same setup
    lines), and return its exit code; on failure show its last lines."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail, seen = [], set()
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-60:]
        if line.startswith("[20"):  # the deepspeed launcher's own log lines: in the log file
            continue
        if "zhllama" in line and any(k in line for k in (" INFO ", " WARNING ", " ERROR ", "error:")):
            shown = line.split(" INFO ", 1)[-1]
            if shown not in seen:
                seen.add(shown)
                say("      " + shown)
    code = proc.wait()
    if code != 0:
        say("      ... last lines of its output:\n" + indent("\n".join(tail[-25:]), 6))
    return code


def train_stage(stage: str, d: Path, overrides: list, ranks: int) -> int:
    """One training step of the demo (its directory `d`) into d/run, on the preset `stage`: its launcher
    with 2 ranks, or `zhllama train` in a plain process (a world of one). Returns the world size it ran with."""
    step = d.name
    logs = d / "logs"
    launcher = REPO / "launch" / LAUNCHERS[stage]
    config = config_file(stage)
    py = sys.executable
    if ranks == 2 and not on_cpu() and torch.cuda.device_count() < 2:
        say("    one GPU: a world of one")
        ranks = 1
    if ranks == 2 and not launcher.is_file():
        say(f"    {launcher} not found (zhllama installed without its repository): a world of one")
        ranks = 1
    if ranks == 2:
        env = command_env(GPUS_PER_NODE="2", MASTER_PORT=str(free_port()), LOG_DIR=str(logs), PYTHON=py,
                          CONFIG=str(config), OMP_NUM_THREADS="1",
                          PATH=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        say(f"    $ {'DS_ACCELERATOR=cpu ' if on_cpu() else ''}GPUS_PER_NODE=2 bash launch/{launcher.name} "
            + " ".join(short(o) for o in overrides))
        code = stream(["bash", str(launcher), *overrides], env)
        if code == 0:
            return 2
        if (d / "run" / "metrics.jsonl").exists():
            raise UserError(f"step {step} failed (exit {code}); its log is in {logs}; rerun the demo to "
                            "resume from the last checkpoint")
        say(f"    the deepspeed launcher failed before any training step (log: {logs}); "
            "retrying as a world of one")
    say(f"    $ zhllama train --config configs/{config.name} " + " ".join(short(o) for o in overrides))
    code = stream([py, "-m", "zhllama.app.cli", "train", "--config", str(config), *overrides], command_env())
    if code != 0:
        raise UserError(f"step {step} failed (exit {code}); rerun the demo to resume from the last checkpoint")
    return 1
