"""Resume for real: bitwise-exact stop/resume, elastic resume, SIGTERM preemption and SIGKILL during saves.

Runs of one process are forked (tests/forked.py: fresh processes that skip the imports); runs of two go through
`accelerate launch`. The unbroken runs, and the runs stopped at step 10, are made once and shared: a test that
resumes one resumes a copy."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from tests import forked
from tests.conftest import REPO, launch, launch_command, tiny_flags
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, verify
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES
from vaegan_dist.exits import Ending
from vaegan_dist.model.losses import LossTerms
from vaegan_dist.model.networks import PerNetwork

# A global batch of 4096 makes an epoch 14 steps: a stop at step 10 falls mid-epoch, and 20 steps cross an epoch.
# The moving averages and spectral norm's power-iteration vectors are kept, so they resume exactly too.
FLAGS = dict(global_batch_size=4096, log_every=5, save_every=10, ema_decay=0.9, spectral_norm=True)
LOSS_KEYS = [*LossTerms.names(), *(f"grad_norm_{n}" for n in PerNetwork._fields), "skipped_steps"]


def train(output_dir, processes, max_steps, **flags):
    """A run of FLAGS on the CPU: one process forked, as `python -m vaegan_dist.train` runs; more under
    `accelerate launch`."""
    args = tiny_flags(**FLAGS, max_steps=max_steps, output_dir=output_dir, **flags)
    if processes == 1:
        result = forked.run("vaegan_dist.train", args, output_dir.parent / "logs",
                            env=forked.default_env(ACCELERATE_USE_CPU="1"))
    else:
        result = launch(args, processes)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(processes): the output directory of a fresh 20-step run of FLAGS, trained on first use and shared by
    the tests; copy it before resuming it."""
    runs = {}

    def run(processes):
        if processes not in runs:
            runs[processes] = tmp_path_factory.mktemp(f"run_{processes}p") / "20_steps"
            train(runs[processes], processes, 20)
        return runs[processes]

    return run


def stopped_at_step_10(output_dir, to):
    """A copy of a 20-step run as a crash after step 10's checkpoint leaves it: that checkpoint the newest, and
    metrics.jsonl holding the records of the steps after it (the resume cuts them)."""
    shutil.copytree(output_dir, to)
    shutil.rmtree(checkpoints_dir(to) / "step_0000020")
    (checkpoints_dir(to) / "latest").write_text("step_0000010\n")
    return to


def final_checkpoint(output_dir):
    """The newest checkpoint, which newest_complete has verified (its SHA-256 marker and its contents)."""
    path = newest_complete(checkpoints_dir(output_dir), report=pytest.fail)
    assert path is not None
    return Checkpoint(path)


def weights(checkpoint):
    return {f"{name}.{key}": value for name in (*PerNetwork._fields, *AVERAGE_FILES.values())
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
def test_stop_and_resume_is_bitwise_identical_to_an_unbroken_run(tmp_path, processes, made):
    straight = made(processes)
    broken = stopped_at_step_10(straight, tmp_path / "broken")
    witness = tmp_path / "pwned"
    stopped = final_checkpoint(broken).path
    for name in ("optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scaler.pt", "model.bin"):
        (stopped / name).write_bytes(pickle.dumps(Payload(witness)))

    resumed = train(broken, processes, 20)

    assert "resume: from" in resumed.stdout and "step 10, epoch 0" in resumed.stdout
    last = final_checkpoint(broken)
    assert_same_weights(weights(final_checkpoint(straight)), weights(last))
    expected = losses_after(straight, 10)
    assert sorted(expected) == [15, 20]
    assert losses_after(broken, 10) == expected
    assert last.state["position"] == {"step": 20, "epoch": 1, "images_seen": 6 * 4096}
    assert not witness.exists()


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_epoch_on_another_process_count(tmp_path, before, after, made):
    run = stopped_at_step_10(made(before), tmp_path / "run")
    resumed = train(run, after, 20)
    assert f"written by {before} processes" in resumed.stdout
    state = final_checkpoint(run).state
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


def test_sigterm_to_one_process_saves_and_the_resumed_run_matches_an_unbroken_one(tmp_path, made):
    straight, preempted = made(2), tmp_path / "preempted"
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
    assert_same_weights(weights(final_checkpoint(straight)), weights(final_checkpoint(preempted)))


def test_sigkill_at_random_moments_during_saves_never_loses_a_complete_checkpoint(tmp_path):
    """20 kills while a run saves every step: each time the newest complete checkpoint loads and the run
    resumes from it. The runs are forked (tests/forked.py): each is a process of its own, killed by SIGKILL."""
    rng = random.Random(0)
    output_dir = tmp_path / "run"
    root, log = checkpoints_dir(output_dir), tmp_path / "log.txt"

    def command(max_steps=None):
        flags = dict(batch_size=16, save_every=1, keep_last=2, log_every=1000, output_dir=output_dir)
        return tiny_flags(**flags, **({"max_steps": max_steps} if max_steps else {}))

    def latest_name():
        return (root / "latest").read_text().strip() if (root / "latest").exists() else None

    newest = None
    for _ in range(20):
        before = latest_name()
        with forked.Forked("vaegan_dist.train", command(), log) as run:
            wait_for(lambda: latest_name() not in (None, before) or run.poll() is not None,  # noqa: B023
                     120, "a new checkpoint")
            assert run.poll() is None, log.read_text()[-3000:]
            time.sleep(rng.uniform(0, 0.1))
            run.kill()
        if newest is not None:
            assert f"resume: from {newest}" in log.read_text()
        newest = newest_complete(root, report=lambda line: None)
        assert newest is not None and verify(newest) is None
        checkpoint = Checkpoint(newest)
        assert [checkpoint.network(name) for name in PerNetwork._fields] and checkpoint.optimizers()
        assert checkpoint.state["position"]["step"] == int(newest.name.split("_")[1])
    finish = Checkpoint(newest).state["position"]["step"] + 2
    resumed = forked.run("vaegan_dist.train", command(finish), tmp_path / "logs")
    assert resumed.returncode == 0 and f"resume: from {newest}" in resumed.stdout, resumed.stderr[-3000:]
