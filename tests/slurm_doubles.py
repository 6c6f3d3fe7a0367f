"""A SLURM job on this machine: test doubles for srun, scontrol and sbatch (and, for tests that only check
commands, accelerate and python), the environment SLURM gives a batch script, and time-bounded runs.

The doubles are bash scripts put first on PATH. Each records how it was called under $DOUBLES_LOG:
- srun runs its command once per node (--nodes=N), all at once, as SLURM_NODEID 0..N-1, each behind the
  command words in FAKE_NODE_PREFIX_<i> if set (e.g. `ip netns exec ns0`); it lists the tasks' pids and
  records each task's exit code;
- scontrol prints FAKE_HOSTNAMES for `show hostnames` and records every call (`requeue ID` among them);
- sbatch records and submits nothing;
- accelerate records its arguments, environment and ignored signals instead of training;
- python prints FAKE_GPUS (launch/local.sh asks it for torch.cuda.device_count()).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.conftest import REPO

JOB_ID = 4242
JOB_NAME = "vaegan"
CLUSTER = "testcluster"

SRUN = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\0' "$@" > "$DOUBLES_LOG/srun.$$.argv"
nodes=1
while [[ $1 == -* ]]; do
    if [[ $1 == --nodes=* ]]; then nodes=${1#--nodes=}; fi
    shift
done
read -ra hosts <<< "$FAKE_HOSTNAMES"
pids=()
for ((i = 0; i < nodes; i++)); do
    prefix_name="FAKE_NODE_PREFIX_$i"
    read -ra prefix <<< "${!prefix_name:-}"
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=${hosts[i]} "${prefix[@]}" "$@" &
    pids+=($!)
    echo $! >> "$DOUBLES_LOG/tasks"
done
status=0
for i in "${!pids[@]}"; do
    code=0
    wait "${pids[i]}" || code=$?
    echo "$code" >> "$DOUBLES_LOG/task_exits.$i"
    if ((code != 0)); then status=$code; fi
done
exit "$status"
"""
SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$DOUBLES_LOG/scontrol.calls"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_HOSTNAMES; fi
"""
SBATCH = r"""#!/usr/bin/env bash
echo "$*" >> "$DOUBLES_LOG/sbatch.calls"
"""
ACCELERATE = r"""#!/usr/bin/env bash
record="$DOUBLES_LOG/accelerate.$$"
printf '%s\0' "$@" > "$record.argv"
env -0 > "$record.env"
grep '^SigIgn:' /proc/$$/status > "$record.sigign"
"""
PYTHON = r"""#!/usr/bin/env bash
echo "$FAKE_GPUS"
"""


def install_doubles(directory: Path, names: tuple[str, ...] = ("srun", "scontrol", "sbatch")) -> Path:
    """Writes the named doubles into directory/bin; returns that bin directory."""
    scripts = {"srun": SRUN, "scontrol": SCONTROL, "sbatch": SBATCH, "accelerate": ACCELERATE, "python": PYTHON}
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    for name in names:
        (bin_dir / name).write_text(scripts[name])
        (bin_dir / name).chmod(0o755)
    return bin_dir


def job_env(tmp_path: Path, doubles: Path, nodes: int, hostnames: list[str], **settings: str) -> dict[str, str]:
    """The environment of a batch script of job JOB_ID on `nodes` nodes, doubles first on PATH; `settings` on top.
    Inherited SLURM_*, WANDB_* and launcher settings are dropped so that nothing from outside changes the test."""
    dropped = ("SLURM_", "SRUN_", "WANDB_", "PET_", "ACCELERATE_", "CUDA_VISIBLE_DEVICES", "NUM_PROCESSES",
               "CPU_PROCESSES", "MAIN_PROCESS_PORT", "PROCESSES_PER_NODE", "HEAD_", "MIXED_PRECISION", "RUNS_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    log = tmp_path / "doubles"
    log.mkdir(exist_ok=True)
    env.update({
        "PATH": f"{doubles}{os.pathsep}{env['PATH']}",
        "DOUBLES_LOG": str(log),
        "FAKE_HOSTNAMES": " ".join(hostnames),
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NAME": JOB_NAME,
        "SLURM_CLUSTER_NAME": CLUSTER,
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[01-{nodes:02d}]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "RUNS_DIR": str(tmp_path / "runs"),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **settings,
    })
    return env


def job_dir(tmp_path: Path) -> Path:
    """Where job JOB_ID writes its outputs."""
    return tmp_path / "runs" / f"{JOB_NAME}-{JOB_ID}"


def calls(env: dict[str, str], name: str) -> list[str]:
    """The recorded calls of a line-recording double (scontrol, sbatch), one string per call."""
    path = Path(env["DOUBLES_LOG"]) / f"{name}.calls"
    return path.read_text().splitlines() if path.exists() else []


def accelerate_calls(env: dict[str, str]) -> list[dict]:
    """What each call of the accelerate double saw: argv, environment, and whether SIGUSR1 was ignored."""
    records = []
    for argv_file in Path(env["DOUBLES_LOG"]).glob("accelerate.*.argv"):
        record = str(argv_file.with_suffix(""))
        environ = dict(item.split("=", 1) for item in Path(f"{record}.env").read_text().split("\0") if item)
        ignored = int(Path(f"{record}.sigign").read_text().split()[1], 16)
        records.append({"argv": argv_file.read_text().split("\0")[:-1], "env": environ,
                        "ignores_usr1": bool(ignored >> (signal.SIGUSR1 - 1) & 1)})
    return sorted(records, key=lambda r: int(r["env"].get("SLURM_NODEID", 0)))


def srun_calls(env: dict[str, str]) -> list[list[str]]:
    return [p.read_text().split("\0")[:-1] for p in sorted(Path(env["DOUBLES_LOG"]).glob("srun.*.argv"))]


def task_exits(env: dict[str, str], nodes: int) -> list[list[int]]:
    """Per node, the exit codes of its srun tasks, one per srun call (job run)."""
    log = Path(env["DOUBLES_LOG"])
    return [[int(code) for code in (log / f"task_exits.{i}").read_text().split()] for i in range(nodes)]


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and all its descendants: torch's workers start sessions of their own, so a process group
    does not hold them."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def signal_job_step(env: dict[str, str], sig: int) -> None:
    """What SLURM's --signal does (without B:): `sig` to every process of the job step's tasks."""
    for pid in (Path(env["DOUBLES_LOG"]) / "tasks").read_text().split():
        signal_tree(int(pid), sig)


def start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Waits for `process`; past `timeout` seconds kills it and everything it started, and fails."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{output[-4000:]}") from None
    return process.returncode, output


def run(command: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 60) -> tuple[int, str]:
    """Runs `command` to the end (bounded by `timeout`); returns its exit code and its output."""
    return finish(start(command, env, cwd), timeout)
