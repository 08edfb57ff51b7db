"""The launch forms of launch/*.sh (docs/cluster.md), for real on CPU ranks (DS_ACCELERATOR=cpu, gloo).

Every form below trains the same tiny stage-2 run on a world of 2 and must give what one node with 2
ranks under the DeepSpeed launcher gives (`one_node`, the reference):
  two nodes      NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=1: two launchers, one out
  outer launcher plain `deepspeed launch/x.sh`, `deepspeed --no_python`, `torchrun --no-python`
  hostfile       HOSTFILE with one host (the local launch path DeepSpeed takes for it)
  slurm          launch/slurm.sbatch with stand-in `srun`/`scontrol` that start 2 tasks with SLURM_*
The two nodes are also SIGKILLed after a checkpoint and restarted: they must end exactly as the
uninterrupted two-node run. The command each form builds is checked without running (DRY_RUN=1) for
what a CPU cannot show: CUDA_VISIBLE_DEVICES and a hostfile without MASTER_ADDR.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, subprocess_env

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
BIN = Path(sys.executable).parent
STEPS = 6
COMMON = [f"max_steps={STEPS}", "global_batch=8", "micro_batch=2", "block_size=32", "lr=0.01",
          "save_every=2", "keep_last=2", "eval_every=0", "tensorboard=false"]
TIMEOUT = 600
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the `deepspeed` command, this python


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _check(res, what):
    assert res.returncode == 0, f"{what} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def _max_differences(run: Path, ref: Path):
    """(max relative loss difference over the steps, max absolute adapter difference)."""
    la, lb = [r["loss"] for r in _metrics(run)], [r["loss"] for r in _metrics(ref)]
    assert len(la) == len(lb) == STEPS
    rel = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys() and len(a) > 0
    return rel, max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_same_as(run: Path, ref: Path, what: str):
    rel, adapter = _max_differences(run, ref)
    print(f"\n{what}: max relative loss difference {rel:.2e}, max adapter abs difference {adapter:.2e}")
    assert rel <= 1e-5, (what, rel)
    assert adapter <= 1e-6, (what, adapter)  # float rounding of weights of size ~0.1
    return rel, adapter


@pytest.fixture(scope="module")
def train_args(tiny_model_dir, tiny_packed):
    return [f"model={tiny_model_dir}", f"data=[{tiny_packed}]", "init_adapters=[]", *COMMON]


def _stage2(*args, **env):
    return subprocess.run(["bash", str(LAUNCH / "pretrain_stage2.sh"), *map(str, args)], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, train_args):
    """The reference: one node, 2 ranks, DeepSpeed's launcher."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    res = _stage2(*train_args, f"out={run}", GPUS_PER_NODE=2, MASTER_PORT=free_port(), LOG_DIR=run.parent / "logs")
    _check(res, "one node x 2 ranks")
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 1))
    assert "world 2 x micro 2 x accum 2" in res.stdout + res.stderr
    return run


def _start_node(node_rank: int, port: int, run: Path, train_args, extra_env=None) -> subprocess.Popen:
    """One loopback "node": its own launcher in its own process group (so it can be killed whole)."""
    env = subprocess_env(NNODES=2, NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GPUS_PER_NODE=1,
                         LOG_DIR=run.parent / "logs", **(extra_env or {}))
    return subprocess.Popen(["bash", str(LAUNCH / "pretrain_stage2.sh"), *train_args, f"out={run}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)


def _wait_all(procs, timeout=TIMEOUT):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, train_args):
    run = tmp_path_factory.mktemp("two_nodes") / "run"
    port = free_port()
    procs = [_start_node(i, port, run, train_args) for i in (0, 1)]
    outs = _wait_all(procs)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {i} exited {p.returncode}\n{out[-4000:]}"
    return run


# ----------------------------------------------------------------------------- commands (no training)

def _dry(*, script="pretrain_stage1.sh", **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), "out=runs/x"], env=subprocess_env(DRY_RUN=1, **env),
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_cuda_visible_devices_choose_the_gpus():
    res = _dry(CUDA_VISIBLE_DEVICES="1,3")
    _check(res, "dry run")
    assert "--include localhost:1\\,3" in res.stdout and "--num_gpus" not in res.stdout, res.stdout
    res = _dry(CUDA_VISIBLE_DEVICES="1,3", GPUS_PER_NODE=1)
    assert "--include localhost:1 " in res.stdout, res.stdout
    res = _dry(CUDA_VISIBLE_DEVICES="1", GPUS_PER_NODE=2)
    assert res.returncode == 2 and "CUDA_VISIBLE_DEVICES=1 has 1" in res.stderr


def test_several_nodes_without_hostfile_need_their_rank_and_master():
    res = _dry(NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1", GPUS_PER_NODE=8)
    _check(res, "dry run")
    assert "torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1" in res.stdout
    assert "--no_ssh" not in res.stdout
    for env, missing in [(dict(NNODES=2, MASTER_ADDR="10.0.0.1"), "NODE_RANK"), (dict(NNODES=2, NODE_RANK=0), "MASTER_ADDR")]:
        res = _dry(**env)
        assert res.returncode == 2 and missing in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_hostfile_without_master_addr_lets_deepspeed_find_node0(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    res = _dry(HOSTFILE=hostfile)
    _check(res, "dry run")
    assert f"--hostfile {hostfile}" in res.stdout and "--master_addr" not in res.stdout, res.stdout
    assert "--master_addr 10.0.0.1" in _dry(HOSTFILE=hostfile, MASTER_ADDR="10.0.0.1").stdout


def test_under_an_outer_launcher_the_script_trains_its_rank_without_nesting():
    res = _dry(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)
    _check(res, "dry run")
    assert res.stdout.split()[1:4] == ["-m", "zhllama.app.cli", "train"], res.stdout
    assert "deepspeed" not in res.stdout and "torch.distributed.run" not in res.stdout
    res = _dry(RANK=0, LOCAL_RANK=0)
    assert res.returncode == 2 and "WORLD_SIZE" in res.stderr


def test_launch_scripts_are_valid_bash_and_python():
    """Plain `deepspeed launch/x.sh` runs the script with python on every rank."""
    import ast
    for name in ("pretrain_stage1.sh", "pretrain_stage2.sh", "sft.sh"):
        text = (LAUNCH / name).read_text()
        ast.parse(text)
        assert subprocess.run(["bash", "-n", str(LAUNCH / name)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0


def test_gpu_check_dry_run_lists_every_stage():
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    _check(res, "gpu_check.sh --dry-run")
    out = res.stdout
    for needle in ("zhllama vocab merge", "zhllama data pack", "zhllama plan", "launch/pretrain_stage1.sh",
                   "launch/pretrain_stage2.sh", "launch/sft.sh", "SIGKILL", "precision=bf16", "pack_examples=true"):
        assert needle in out, (needle, out)


# ----------------------------------------------------------------------------- training, world of 2

@pytest.mark.slow
def test_two_loopback_nodes_equal_one_node_with_two_ranks(two_nodes, one_node):
    _assert_same_as(two_nodes, one_node, "2 nodes x 1 rank vs 1 node x 2 ranks")
    assert sorted(p.name for p in (two_nodes / "checkpoints").iterdir()) == [f"step-{STEPS - 2}", f"step-{STEPS}"]
    for i in (0, 1):
        assert (two_nodes.parent / "logs" / f"pretrain_stage2_node{i}.log").is_file()


@pytest.mark.slow
def test_sigkill_of_one_node_then_restart_resumes_exactly(tmp_path, train_args, two_nodes):
    """Node 0's rank is SIGKILLed after step 3 (checkpoint step-2 complete; the engine's test hook, so
    the moment is exact), node 0's launcher then stops, node 1 loses its peer; both are restarted."""
    run = tmp_path / "run"
    port = free_port()
    procs = [_start_node(0, port, run, train_args, {"ZHLLAMA_CRASH": "after-step:3"}),
             _start_node(1, port, run, train_args)]
    _wait_all(procs[:1])
    for p in procs:  # whatever is left of either node (node 1 may wait on its lost peer)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out1 = _wait_all(procs[1:], timeout=60)[0]
    assert procs[0].returncode != 0, "node 0 was not killed"
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3], out1[-3000:]
    assert (run / "checkpoints" / "step-2" / "zhllama_state.json").is_file()
    assert not (run / "final").exists()

    port = free_port()
    procs = [_start_node(i, port, run, train_args) for i in (0, 1)]
    outs = _wait_all(procs)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"restarted node {i} exited {p.returncode}\n{out[-4000:]}"
    assert f"resumed from {run / 'checkpoints' / 'step-2'}" in outs[0], outs[0][-3000:]
    # The steps and the final adapter are exactly those of the uninterrupted run.
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(two_nodes)]
    a, b = _adapter(run), _adapter(two_nodes)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _outer(cmd, run, **env):
    return subprocess.run(cmd, env=subprocess_env(LOG_DIR=run.parent / "logs", **env), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["deepspeed", "deepspeed --no_python", "torchrun --no-python", "hostfile", "slurm"])
def test_every_launch_form_trains_the_same_world_of_two(form, tmp_path, train_args, one_node):
    run = tmp_path / "run"
    args = [*train_args, f"out={run}"]
    port = free_port()
    script = str(LAUNCH / "pretrain_stage2.sh")
    if form == "deepspeed":  # `python launch/pretrain_stage2.sh --local_rank=N ...` on each rank
        res = _outer([*DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), script, *args], run)
    elif form == "deepspeed --no_python":
        res = _outer([*DEEPSPEED, "--no_python", "--num_gpus", "2", "--master_port", str(port), script, *args], run)
    elif form == "torchrun --no-python":
        res = _outer([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      str(port), "--no-python", "bash", script, *args], run)
    elif form == "hostfile":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        res = _outer(["bash", script, *args], run, HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     LAUNCHER_ARGS="--no_ssh_check")
    else:  # slurm: stand-ins for srun (2 tasks on this host) and scontrol (the job's first host)
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "srun").write_text(
            "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
            "for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & done\n"
            "rc=0; for job in $(jobs -p); do wait $job || rc=$?; done; exit $rc\n")
        (fake / "scontrol").write_text(
            "#!/usr/bin/env bash\n[ \"$1 $2 $3\" = \"show hostnames $SLURM_JOB_NODELIST\" ] && echo 127.0.0.1\n")
        for f in fake.iterdir():
            f.chmod(0o755)
        res = _outer(["bash", str(LAUNCH / "slurm.sbatch"), "stage2", *args], run, SLURM_NTASKS=2,
                     SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=REPO, MASTER_PORT=port,
                     PATH=f"{fake}:{BIN}:{os.environ['PATH']}")
        assert "master 127.0.0.1" in res.stdout
    _check(res, form)
    assert "world 2 x micro 2 x accum 2" in res.stdout + res.stderr
    _assert_same_as(run, one_node, f"{form} vs one node")
