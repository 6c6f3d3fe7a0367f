"""W&B sweeps: launch/sweep.yaml, train.py reading every flag form a sweep agent writes, and the SLURM array job
of agents (launch/slurm/sweep_agents.sbatch) with the SLURM doubles and a double of `wandb agent` that builds
each trial's command from sweep.yaml with wandb's own code."""

from __future__ import annotations

import sys

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from tests.conftest import REPO
from tests.slurm_doubles import (
    JOB_ID,
    accelerate_calls,
    calls,
    install_doubles,
    job_env,
    run,
    srun_calls,
)
from vaegan_dist.cli.train import parse_args
from vaegan_dist.config import FIELD_NAMES, TrainConfig
from vaegan_dist.evaluation.scores import SAMPLE_ROWS

SWEEP = yaml.safe_load((REPO / "launch/sweep.yaml").read_text())


def agent_forms(values: dict) -> dict[str, list[str]]:
    """The command-line forms of these values that wandb's agent can put in a sweep command."""
    formats = create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    return {name: formats[name] for name in ("args", "args_no_boolean_flags", "args_no_equals")}


VALUES = {"lr": 0.0003, "ema_decay": 0.999, "batch_size": 32, "gamma": 2.5, "beta": 10, "spectral_norm": True,
          "compile": False, "eval_every": 2000, "max_steps": None, "similarity": "logit", "mixed_precision": "no",
          "global_batch_size": None}


@pytest.mark.parametrize("form", ["args", "args_no_boolean_flags", "args_no_equals"])
def test_train_py_reads_every_flag_form_a_sweep_agent_writes(form):
    argv = agent_forms(VALUES)[form]
    assert "--ema_decay=0.999" in argv or "--ema_decay" in argv  # underscores, as the agent writes them
    config = parse_args(argv)
    for key, value in VALUES.items():
        assert getattr(config, key) == value, (key, argv)


def test_false_and_true_booleans_in_every_spelling():
    for text, expected in [("True", True), ("False", False), ("true", True), ("false", False), ("1", True),
                           ("0", False)]:
        assert parse_args([f"--spectral_norm={text}"]).spectral_norm is expected
    assert parse_args(["--spectral-norm", "--no_spectral_norm"]).spectral_norm is False
    assert parse_args(["--output_dir=runs/a_b", "--lr", "0.001"]).output_dir == "runs/a_b"  # values keep "_"


def test_the_sweep_yaml_sweeps_real_settings_and_minimises_a_logged_metric():
    assert SWEEP["program"] == "train.py"
    assert {"lr", "gamma", "beta", "batch_size", "ema_decay"} <= set(SWEEP["parameters"])
    assert set(SWEEP["parameters"]) <= FIELD_NAMES
    metric = SWEEP["metric"]
    assert metric["goal"] == "minimize" and metric["name"] == "eval/fid"
    assert metric["name"].removeprefix("eval/") in {key for key, _, _ in SAMPLE_ROWS}  # what the evaluation logs
    # the metric exists mid-run (hyperband needs it), at the same images seen whatever the trial's batch size
    assert SWEEP["parameters"]["eval_every_images"]["value"] > 0 and "eval_every" not in SWEEP["parameters"]
    assert SWEEP["command"][-1] == "${args}" and "launch/sweep_trial.sh" in SWEEP["command"]
    # every value the sweep can draw makes a valid config
    for key, spec in SWEEP["parameters"].items():
        for value in spec.get("values", [spec.get("value", spec.get("min")), spec.get("max", spec.get("value"))]):
            TrainConfig.from_dict({key: value})


# `wandb agent --count K SWEEP_ID`, as far as the trials see it: K runs of sweep.yaml's command, built by wandb's
# own code, each with its W&B run id in WANDB_RUN_ID (FAKE_RUN_IDS: the ids the sweep hands out, in order).
WANDB_AGENT = f"""#!{sys.executable}
import os, subprocess, sys, yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
log = os.environ["DOUBLES_LOG"]
with open(os.path.join(log, "wandb.calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
assert sys.argv[1:3] == ["agent", "--count"], sys.argv
count, ids = int(sys.argv[3]), os.environ["FAKE_RUN_IDS"].split()
sweep = yaml.safe_load(open("launch/sweep.yaml"))
params = sweep["parameters"]
values = {{key: spec.get("value", spec.get("values", [spec.get("min")])[0]) for key, spec in params.items()}}
formats = create_sweep_command_args({{"args": {{k: {{"value": v}} for k, v in values.items()}}}})
formats["env"] = ["/usr/bin/env"]
for run_id in ids[:count]:
    command = []
    for word in create_sweep_command(list(sweep["command"])):
        command += formats[word[2:-1]] if word.startswith("${{") else [word]
    code = subprocess.call(command, env={{**os.environ, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_ID": "sw1"}})
    with open(os.path.join(log, "wandb.trials"), "a") as f:
        f.write(f"{{run_id}} {{code}}\\n")
"""


@pytest.fixture
def doubles(tmp_path):
    bin_dir = install_doubles(tmp_path, ("srun", "scontrol", "sbatch", "accelerate", "python"))
    (bin_dir / "wandb").write_text(WANDB_AGENT)
    (bin_dir / "wandb").chmod(0o755)
    return bin_dir


def trial_flags(node: dict) -> list[str]:
    argv = node["argv"]
    return argv[argv.index(f"{REPO}/train.py") + 1:]


def test_each_array_task_runs_an_agent_whose_trials_have_their_own_run_and_directory(tmp_path, doubles):
    runs = tmp_path / "sweep-runs"
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_GPUS="2", SLURM_CPUS_PER_TASK="8",
                  SLURM_ARRAY_TASK_ID="3", FAKE_RUN_IDS="abc123 def456 ghi789", SWEEP_RUNS_DIR=str(runs),
                  WANDB_RUN_ID="stale-from-outside", WANDB_RESUME="must")
    code, output = run(["bash", "launch/slurm/sweep_agents.sbatch", "me/vaegan/sw1", "2"], env)
    assert code == 0, output
    [srun] = srun_calls(env)
    assert srun[:3] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=8"]
    assert calls(env, "wandb") == ["agent --count 2 me/vaegan/sw1"]
    trials = accelerate_calls(env)
    assert len(trials) == 2
    for run_id, trial in zip(("abc123", "def456"), sorted(trials, key=lambda t: t["env"]["WANDB_RUN_ID"]),
                             strict=True):
        assert trial["env"]["WANDB_RUN_ID"] == run_id and "WANDB_RESUME" not in trial["env"]
        assert trial["ignores_usr1"]
        flags = trial_flags(trial)
        assert flags[:5] == ["--output-dir", str(runs / run_id), "--resume", "auto", "--requeue"]
        assert "--ema_decay=0.0" in flags  # the agent's own form reaches train.py, which reads it:
        config = parse_args(flags)
        assert config.output_dir == str(runs / run_id) and config.requeue and config.eval_every_images == 128000
        assert config.lr == SWEEP["parameters"]["lr"]["min"] and config.ema_decay == 0.0
    assert calls(env, "scontrol") == []  # only a preempted trial requeues its task (train.py --requeue)


def test_a_requeued_task_resumes_the_trial_the_sweep_hands_back_in_its_directory(tmp_path, doubles):
    """After a preemption the run (marked preempting) is handed out again under its id: same directory,
    --resume auto finds its checkpoint."""
    runs = tmp_path / "sweep-runs"
    directories = []
    for _ in range(2):  # the task's first run, then the same task after `scontrol requeue`
        env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_GPUS="1", FAKE_RUN_IDS="abc123",
                      SWEEP_RUNS_DIR=str(runs))
        code, output = run(["bash", "launch/slurm/sweep_agents.sbatch", "sw1"], env)
        assert code == 0, output
        flags = trial_flags(max(accelerate_calls(env), key=lambda t: t["env"]["WANDB_RUN_ID"]))
        directories.append(parse_args(flags).output_dir)
        assert parse_args(flags).resume == "auto"
    assert directories == [str(runs / "abc123")] * 2


def test_default_output_directories_are_keyed_by_sweep_and_run(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_GPUS="1", FAKE_RUN_IDS="r1")
    code, output = run(["bash", "launch/slurm/sweep_agents.sbatch", "me/proj/sw9"], env)
    assert code == 0, output
    [trial] = accelerate_calls(env)
    assert trial_flags(trial)[:2] == ["--output-dir", "runs/sweep-sw9/r1"]
    assert str(JOB_ID) in output


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no sweep id"),
])
def test_bad_submissions_stop_with_one_line(tmp_path, doubles, argv, message):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_RUN_IDS="r1")
    code, output = run(["bash", "launch/slurm/sweep_agents.sbatch", *argv], env)
    assert code == 2 and output.startswith("error: ") and message in output


def test_a_trial_outside_an_agent_stops_with_one_line(tmp_path, doubles):
    env = job_env(tmp_path, doubles, nodes=1, hostnames=["gpu07"], FAKE_GPUS="1")
    code, output = run(["bash", "launch/sweep_trial.sh", "--lr=0.001"], env)
    assert code == 2 and output.startswith("error: WANDB_RUN_ID is not set")


def test_sweep_command_macros_are_the_agents():
    assert create_sweep_command(list(SWEEP["command"]))[0] == "${env}"
