"""--cuda-graphs where it cannot run: each unsupported case is a one-line error naming the setting, exit code 2.
(The captured step itself is tested on a GPU: tests/test_gpu.py.)"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from tests.conftest import REPO, tiny_config, tiny_flags
from vaegan_dist.cli.train import parse_args
from vaegan_dist.config import ConfigError
from vaegan_dist.model.networks import build_models
from vaegan_dist.training.cuda_graphs import check_launch_free
from vaegan_dist.training.loop import train
from vaegan_dist.training.step import adam_optimizers


def test_cuda_graphs_is_off_by_default_and_a_flag():
    assert tiny_config().cuda_graphs is False
    assert parse_args(["--cuda-graphs"]).cuda_graphs is True


@pytest.mark.parametrize(("overrides", "problem"), [
    (dict(compile=True), "cannot be combined with 'compile'"),
    (dict(mixed_precision="fp16"), "does not support fp16"),
])
def test_unsupported_combinations_are_config_errors(overrides, problem):
    with pytest.raises(ConfigError, match=f"setting 'cuda_graphs' {problem}"):
        tiny_config(cuda_graphs=True, **overrides)
    tiny_config(cuda_graphs=False, **overrides)  # each alone is fine
    tiny_config(cuda_graphs=True, mixed_precision="bf16")


@pytest.mark.parametrize(("device", "processes", "problem"), [
    ("cpu", 1, "needs a CUDA GPU, and this run is on cpu: drop --cuda-graphs"),
    ("cuda", 2, "runs one process only, not 2"),
    ("cpu", 2, "runs one process only, not 2"),
])
def test_the_device_check_names_the_setting_and_what_to_do(device, processes, problem):
    accelerator = SimpleNamespace(device=torch.device(device), num_processes=processes)
    with pytest.raises(ConfigError, match=f"setting 'cuda_graphs' {problem}"):
        check_launch_free(tiny_config(cuda_graphs=True), accelerator)
    check_launch_free(tiny_config(), accelerator)  # off: nothing to check
    if device == "cuda" and processes == 1:
        check_launch_free(tiny_config(cuda_graphs=True), accelerator)


def test_train_refuses_cuda_graphs_on_the_cpu_before_writing_anything(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(ConfigError, match="setting 'cuda_graphs' needs a CUDA GPU"):
        train(tiny_config(cuda_graphs=True, output_dir=str(output), max_steps=1), Accelerator(cpu=True))
    assert not output.exists()


@pytest.mark.parametrize(("extra", "problem"), [
    ([], "needs a CUDA GPU"),
    (["--compile"], "cannot be combined with 'compile'"),
])
def test_the_command_line_fails_with_one_line_and_exit_code_2(tmp_path, extra, problem):
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.train",
                             *tiny_flags(max_steps=1, output_dir=tmp_path / "run", cuda_graphs=True), *extra],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={"ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin",
                                 "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: setting 'cuda_graphs' ") and problem in lines[0]


def test_optimizers_are_capturable_only_with_cuda_graphs():
    config = tiny_config()
    assert not any(opt.param_groups[0]["capturable"] for opt in adam_optimizers(build_models(config), config))
    config = tiny_config(cuda_graphs=True)
    assert all(opt.param_groups[0]["capturable"] and opt.param_groups[0]["fused"]
               for opt in adam_optimizers(build_models(config), config))
