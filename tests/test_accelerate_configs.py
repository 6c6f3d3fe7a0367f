"""`accelerate config` files users already have: what the trainer cannot honour (FSDP, DeepSpeed, Megatron-LM,
gradient accumulation, accelerate's dynamo backend) stops train.py at once with one line; mixed precision from
the file or the flag keeps working. Driven through real `accelerate launch --config_file` on CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, tiny_flags
from vaegan_dist.training.cpu import cpu_flags, emulates_bf16
from vaegan_dist.training.launch_settings import unsupported_launch_setting

BASE = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "mixed_precision": "no"}
CONFIGS = {
    "fsdp": ({"distributed_type": "FSDP", "num_processes": 2,
              "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD"}}, "FSDP (distributed_type: FSDP)"),
    "megatron": ({"distributed_type": "MEGATRON_LM", "num_processes": 2,
                  "megatron_lm_config": {"megatron_lm_tp_degree": 1}}, "Megatron-LM"),
    "dynamo": ({"distributed_type": "NO", "num_processes": 1, "dynamo_config": {"dynamo_backend": "INDUCTOR"}},
               "the dynamo backend INDUCTOR"),
}


def accelerate_launch(tmp_path, config: dict, args: list[str], extra_env: dict | None = None,
                      launch_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({**BASE, **config}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
               "--main_process_port", "0", *launch_flags, str(REPO / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def assert_stopped_with_one_line(result: subprocess.CompletedProcess, setting: str, todo: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # the first process alone says it
    assert setting in errors[0] and todo in errors[0], errors[0]
    # train.py exits 2; accelerate launch then reports the failed process (and exits 1) in its own words
    assert result.returncode != 0
    assert "exit status 2" in result.stderr or "exitcode: 2" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split(errors[0])[0]  # nothing of train.py's own before the line
    assert "step" not in result.stdout.lower()  # it stopped before training


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_config_asking_for_what_the_trainer_cannot_honour_stops_with_one_line(tmp_path, name):
    config, setting = CONFIGS[name]
    todo = "--compile" if name == "dynamo" else "distributed_type: MULTI_GPU"
    result = accelerate_launch(tmp_path, config, tiny_flags(max_steps=2, output_dir=tmp_path / "out"))
    assert_stopped_with_one_line(result, setting, todo)
    assert not (tmp_path / "out").exists()


def test_gradient_accumulation_from_the_environment_stops_with_one_line(tmp_path):
    result = accelerate_launch(tmp_path, {"distributed_type": "NO", "num_processes": 1},
                               tiny_flags(max_steps=2, output_dir=tmp_path / "out"),
                               extra_env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert_stopped_with_one_line(result, "gradient accumulation over 4 steps", "--global-batch-size")


def test_deepspeed_stops_with_one_line(tmp_path):
    """accelerate launch itself refuses a DeepSpeed config without the deepspeed package; with it, the launcher
    sets ACCELERATE_USE_DEEPSPEED (and DeepSpeed's gradient accumulation), which is what train.py sees here."""
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--max-steps", "2"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: accelerate asks for DeepSpeed") and len(result.stderr.splitlines()) == 1


def test_each_setting_and_its_harmless_values():
    assert unsupported_launch_setting({}) is None
    harmless = {"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "False", "ACCELERATE_DYNAMO_BACKEND": "NO",
                "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert unsupported_launch_setting(harmless) is None
    assert "Megatron-LM" in unsupported_launch_setting({"ACCELERATE_USE_MEGATRON_LM": "true"})
    assert "over 8 steps" in unsupported_launch_setting({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8"})
    assert "backend EAGER" in unsupported_launch_setting({"ACCELERATE_DYNAMO_BACKEND": "EAGER"})


@pytest.mark.parametrize("source", ["config file", "flag"])
def test_mixed_precision_from_the_config_file_or_the_flag_still_applies(tmp_path, source):
    config = {"distributed_type": "NO", "num_processes": 1, "dynamo_config": {"dynamo_backend": "NO"}}
    if source == "config file":
        result = accelerate_launch(tmp_path, {**config, "mixed_precision": "bf16"},
                                   tiny_flags(max_steps=2, output_dir=tmp_path / "out"))
    else:
        result = accelerate_launch(tmp_path, config, tiny_flags(max_steps=2, output_dir=tmp_path / "out"),
                                   launch_flags=("--mixed_precision", "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error" not in result.stderr
    assert "bf16" in [line.split("│")[2].strip() for line in result.stdout.splitlines()
                      if "mixed precision" in line and line.count("│") >= 3][0:1]
    # Exactly when this machine's CPU, whichever it is, lacks bf16 instructions, the run says bf16 is emulated.
    assert ("this CPU has no bf16 instructions" in " ".join(result.stderr.split())) == emulates_bf16(cpu_flags())
