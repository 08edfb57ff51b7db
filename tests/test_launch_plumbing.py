"""Cluster plumbing of the launchers, without training: slurm.sbatch's resources and srun flags with a
stand-in `srun` on PATH, the network variables reaching every rank, and bash 4.2 compatibility (the
launchers under `bash --posix`, and no bare expansion of a possibly empty array under `set -u`, which
bash <= 4.3 reports as an unbound variable; no bash older than 5.2 can be installed on this machine)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = [LAUNCH / "common.sh", LAUNCH / "slurm.sbatch", REPO / "scripts" / "gpu_check.sh",
           REPO / "scripts" / "offline_bundle.sh"]
NET = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1"}


def _stand_ins(tmp_path: Path) -> Path:
    """`srun` that records its arguments and starts SLURM_NTASKS tasks on this host; `scontrol`."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$SRUN_ARGS\"\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & done\n"
        "rc=0; for job in $(jobs -p); do wait $job || rc=$?; done; exit $rc\n")
    (fake / "scontrol").write_text(
        "#!/usr/bin/env bash\n[ \"$1 $2 $3\" = \"show hostnames $SLURM_JOB_NODELIST\" ] && echo node1 && echo node2\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    return fake


@pytest.mark.parametrize("shell", [["bash"], ["bash", "--posix"]])
def test_slurm_job_binds_no_gpu_takes_whole_nodes_and_passes_the_network(tmp_path, shell):
    header = [line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --exclusive" in header and "#SBATCH --mem=0" in header
    fake = _stand_ins(tmp_path)
    res = subprocess.run([*shell, str(LAUNCH / "slurm.sbatch"), "stage2", "out=runs/x"], cwd=REPO,
                         env=subprocess_env(PATH=f"{fake}:{os.environ['PATH']}", SRUN_ARGS=tmp_path / "srun.args",
                                            SLURM_NTASKS=2, SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=REPO,
                                            DRY_RUN=1, **NET),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    srun = (tmp_path / "srun.args").read_text().splitlines()
    assert srun[:3] == ["--kill-on-bad-exit=1", "--gpu-bind=none", "--export=ALL"]
    assert srun[-2:] == [str(REPO / "launch" / "pretrain_stage2.sh"), "out=runs/x"]
    out = res.stdout.splitlines()
    assert out[0] == ("slurm.sbatch: stage2 on 2 tasks, master node1:29500, network: "
                      "NCCL_IB_HCA=mlx5_0,mlx5_1 NCCL_SOCKET_IFNAME=ib0")
    # each task: the outer-launcher form (no launcher inside the job), with the job's config
    tasks = [line for line in out if "zhllama.app.cli train" in line]
    assert len(tasks) == 2 and all(f"--config {REPO}/launch/../configs/stage2.yaml out=runs/x" in t for t in tasks)
    # the network settings reach the tasks; the task with LOCAL_RANK 0 says so once for its node
    said = [line for line in res.stderr.splitlines() if line.startswith("launch: network settings")]
    assert said == ["launch: network settings for every rank: NCCL_IB_HCA=mlx5_0,mlx5_1 NCCL_SOCKET_IFNAME=ib0"]


def _dry(shell, **env):
    return subprocess.run([*shell, str(LAUNCH / "pretrain_stage1.sh"), "out=runs/x"], cwd=REPO,
                          env=subprocess_env(DRY_RUN=1, **env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("form", [dict(GPUS_PER_NODE=8), dict(CUDA_VISIBLE_DEVICES="0,1"),
                                  dict(NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1", GPUS_PER_NODE=8),
                                  dict(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)])
def test_every_launch_form_runs_under_bash_posix_with_no_launcher_args(form):
    """LAUNCHER_ARGS unset: the launcher's extra arguments are an empty array."""
    plain, posix = _dry(["bash"], **form), _dry(["bash", "--posix"], **form)
    assert plain.returncode == posix.returncode == 0, posix.stderr
    assert plain.stdout == posix.stdout and "zhllama.app.cli train" in posix.stdout


def test_hostfile_form_under_bash_posix(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\n")
    res = _dry(["bash", "--posix"], HOSTFILE=hostfile, LAUNCHER_ARGS="--launcher openmpi", **NET)
    assert res.returncode == 0, res.stderr
    assert "--hostfile" in res.stdout and "--launcher openmpi --no_local_rank" in res.stdout
    assert "launch: network settings for every rank: NCCL_IB_HCA=mlx5_0,mlx5_1 NCCL_SOCKET_IFNAME=ib0" in res.stderr


def _maybe_empty_arrays(text: str) -> set:
    """Arrays a script may leave empty: assigned () or filled by `read -a`."""
    names = set(re.findall(r"\b(\w+)=\(\)", text)) | set(re.findall(r"read -r -a (\w+)", text))
    return names


def test_no_bare_expansion_of_a_possibly_empty_array():
    """bash <= 4.3 under `set -u`: "${a[@]}" of an empty array is an unbound variable. Such arrays are
    expanded as ${a[@]+"${a[@]}"} (or only counted, or expanded where the script knows they are not empty)."""
    for script in SCRIPTS:
        text = script.read_text()
        for name in _maybe_empty_arrays(text):
            for m in re.finditer(r'"\$\{%s\[[@*]\]\}"' % re.escape(name), text):
                before = text[max(0, m.start() - len(name) - 8):m.start()]
                line = text[:m.start()].count("\n") + 1
                guarded = before.endswith("[@]+") or "# not empty here" in text.splitlines()[line - 1]
                assert guarded, f"{script.name}:{line}: bare \"${{{name}[@]}}\" of a possibly empty array"
