"""Shared helpers: tiny configurations, and training runs launched the way users launch them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaegan_dist.config import TrainConfig
from vaegan_dist.hub.model import export_networks
from vaegan_dist.model.networks import build_models

REPO = Path(__file__).resolve().parents[1]
# Small networks and batches, no evaluation (it takes most of a minute on a CPU), one thread per process: the
# suite runs on 2 CPU cores.
TINY = dict(hidden_dim=32, depth=2, latent_dim=4, batch_size=16, log_every=5, cpu_threads=1, eval_samples=0)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig.preset("seed", **{**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """Command-line flags for a tiny run."""
    flags = []
    for key, value in {**TINY, **overrides}.items():
        flag = key.replace("_", "-")
        flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return flags


def launch_command(args: list[str], num_processes: int = 1, env: dict[str, str] | None = None,
                   script: Path = REPO / "train.py") -> tuple[list[str], dict[str, str]]:
    """The command and environment that run a script (train.py) under `accelerate launch`: N CPU processes
    over gloo, as the README tells users."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    else:
        command += ["--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(script), *args]
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return command, full_env


def launch(args: list[str], num_processes: int = 1, timeout: float = 300, env: dict[str, str] | None = None,
           cwd: Path | None = None, script: Path = REPO / "train.py") -> subprocess.CompletedProcess:
    """Runs launch_command's command to its end."""
    command, full_env = launch_command(args, num_processes, env, script)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)


@pytest.fixture(autouse=True)
def no_wandb_unless_asked(monkeypatch):
    """Runs that a test starts log nothing to W&B unless the test asks: a developer's API key must not matter."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def tiny() -> TrainConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """A directory holding a freshly initialised tiny encoder and decoder, as export_networks writes them."""
    config = tiny_config()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder, decoder, _ = build_models(config)
    return export_networks(encoder, decoder, config, tmp_path_factory.mktemp("export"))
