"""Resume for real: bitwise-exact stop/resume, elastic resume, SIGTERM preemption and SIGKILL during saves."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.conftest import REPO, launch, launch_command, tiny_flags
from vaegan_dist.checkpoint import AVERAGE_FILES, Checkpoint, checkpoints_dir, newest_complete, verify
from vaegan_dist.exits import Ending
from vaegan_dist.losses import LossTerms
from vaegan_dist.models import Networks

# A global batch of 4096 makes an epoch 14 steps: a stop at step 10 falls mid-epoch, and 20 steps cross an epoch.
# The moving averages and spectral norm's power-iteration vectors are kept, so they resume exactly too.
FLAGS = dict(global_batch_size=4096, log_every=5, ema_decay=0.9, spectral_norm=True)
LOSS_KEYS = [*LossTerms.names(), *(f"grad_norm_{n}" for n in Networks._fields), "skipped_steps"]


def train(output_dir, processes, max_steps, **flags):
    result = launch(tiny_flags(**FLAGS, max_steps=max_steps, output_dir=output_dir, **flags), processes)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_checkpoint(output_dir):
    path = newest_complete(checkpoints_dir(output_dir), report=pytest.fail)
    assert path is not None and verify(path) is None
    return Checkpoint(path)


def weights(output_dir):
    checkpoint = final_checkpoint(output_dir)
    return {f"{name}.{key}": value for name in (*Networks._fields, *AVERAGE_FILES.values())
            for key, value in checkpoint.network(name).items()}


def losses_after(output_dir, step):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in records if r["step"] > step}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Payload:
    """A pickle that creates a file when unpickled."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return (open, (self.witness, "w"))


@pytest.mark.parametrize("processes", [1, 2])
def test_stop_and_resume_is_bitwise_identical_to_an_unbroken_run(tmp_path, processes):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(straight, processes, 20)
    train(broken, processes, 10)
    witness = tmp_path / "pwned"
    for name in ("optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scaler.pt", "model.bin"):
        (final_checkpoint(broken).path / name).write_bytes(pickle.dumps(Payload(witness)))

    resumed = train(broken, processes, 20)

    assert "resume: from" in resumed.stdout and "step 10, epoch 0" in resumed.stdout
    assert_same_weights(weights(straight), weights(broken))
    expected = losses_after(straight, 10)
    assert sorted(expected) == [15, 20]
    assert losses_after(broken, 10) == expected
    assert final_checkpoint(broken).state["position"] == {"step": 20, "epoch": 1, "images_seen": 6 * 4096}
    assert not witness.exists()


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_epoch_on_another_process_count(tmp_path, before, after):
    train(tmp_path, before, 10)
    resumed = train(tmp_path, after, 20)
    assert f"written by {before} processes" in resumed.stdout
    state = final_checkpoint(tmp_path).state
    assert state["world_size"] == after and state["position"]["step"] == 20
    assert len(set(state["replica_digests"])) == 1 and len(state["replica_digests"]) == after


def worker_pids(launcher: subprocess.Popen, count: int, timeout: float = 120) -> list[int]:
    """The training processes that `accelerate launch` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if any(arg.endswith("train.py") for arg in p.cmdline()) and "accelerate" not in " ".join(
                       p.cmdline()[:3])]
        if len(workers) == count:
            return [p.pid for p in workers]
        time.sleep(0.2)
    raise AssertionError("the training processes did not start")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_to_one_process_saves_and_the_resumed_run_matches_an_unbroken_one(tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    train(straight, 2, 20)
    command, env = launch_command(tiny_flags(**FLAGS, max_steps=20, output_dir=preempted), num_processes=2)
    metrics = preempted / "metrics.jsonl"
    stop_at = random.Random().randint(1, 3)  # after 5, 10 or 15 steps have been logged
    with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as launcher:
        try:
            victim = random.Random().choice(worker_pids(launcher, 2))
            wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= stop_at, 120, "steps")
            os.kill(victim, signal.SIGTERM)
            output, _ = launcher.communicate(timeout=120)
        finally:
            os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert launcher.returncode != 0, output[-3000:]  # accelerate reports the workers' exit code 75 as a failure
    assert "stopped by SIGTERM" in output and f"exitcode  : {Ending.PREEMPTED}" in output, output[-3000:]
    stopped_at = final_checkpoint(preempted).state["position"]["step"]
    assert 5 * stop_at <= stopped_at < 20

    resumed = train(preempted, 2, 20)
    assert f"step {stopped_at}" in resumed.stdout
    assert_same_weights(weights(straight), weights(preempted))


def test_sigkill_at_random_moments_during_saves_never_loses_a_complete_checkpoint(tmp_path):
    """20 kills while a run saves every step: each time the newest complete checkpoint loads and the run
    resumes from it."""
    rng = random.Random(0)
    root, log = checkpoints_dir(tmp_path), tmp_path / "log.txt"

    def command(max_steps=None):
        flags = dict(batch_size=16, save_every=1, keep_last=2, log_every=1000, output_dir=tmp_path)
        return [sys.executable, "-m", "vaegan_dist.train",
                *tiny_flags(**flags, **({"max_steps": max_steps} if max_steps else {}))]

    def latest_name():
        return (root / "latest").read_text().strip() if (root / "latest").exists() else None

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    newest = None
    for _ in range(20):
        before = latest_name()
        with log.open("w") as out, subprocess.Popen(command(), env=env, cwd=REPO, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True) as run:
            wait_for(lambda: latest_name() not in (None, before), 120, "a new checkpoint")  # noqa: B023
            time.sleep(rng.uniform(0, 0.1))
            os.killpg(run.pid, signal.SIGKILL)
        if newest is not None:
            assert f"resume: from {newest}" in log.read_text()
        newest = newest_complete(root, report=lambda line: None)
        assert newest is not None and verify(newest) is None
        checkpoint = Checkpoint(newest)
        assert [checkpoint.network(name) for name in Networks._fields] and checkpoint.optimizers()
        assert checkpoint.state["position"]["step"] == int(newest.name.split("_")[1])
    finish = Checkpoint(newest).state["position"]["step"] + 2
    resumed = subprocess.run(command(finish), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resume: from {newest}" in resumed.stdout, resumed.stderr[-3000:]
