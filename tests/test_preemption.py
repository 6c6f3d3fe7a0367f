"""Stops that must not lose work: SIGUSR1 with SLURM requeue, and a save that fails on one process only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, launch, tiny_flags
from tests.test_resume import final_checkpoint, wait_for
from vaegan_dist.checkpoint import checkpoints_dir, newest_complete
from vaegan_dist.exits import Ending


def test_sigusr1_saves_exits_75_and_requeues_the_slurm_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "vaegan_dist.train",
               *tiny_flags(batch_size=16, log_every=1, requeue=True, output_dir=out)]
    with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as run:
        try:
            wait_for(lambda: (out / "metrics.jsonl").exists(), 120, "training to start")
            time.sleep(0.2)
            run.send_signal(signal.SIGUSR1)
            output, _ = run.communicate(timeout=120)
        finally:
            run.kill()
    assert run.returncode == Ending.PREEMPTED, output[-3000:]
    assert "stopped by SIGUSR1" in output and "requeued SLURM job 4242" in output
    assert calls.read_text() == "requeue 4242\n"
    assert final_checkpoint(out).state["position"]["step"] > 0


def test_a_save_failing_on_one_process_fails_on_all_and_keeps_the_previous_checkpoint(tmp_path):
    result = launch([str(tmp_path)], num_processes=2, script=REPO / "tests" / "scripts" / "ddp_checkpoint.py")
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "process 1: OSError: [Errno 28] No space left on device" in outcome, outcome
        assert "process 0" not in outcome
    assert newest_complete(checkpoints_dir(tmp_path), report=print).name == "step_0000001"
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == "step_0000001\n"
