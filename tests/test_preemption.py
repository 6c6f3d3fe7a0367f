"""Stops that must not lose work: SIGUSR1 with SLURM requeue, and a save that fails on one process only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import forked
from tests.conftest import REPO, launch, launch_command, tiny_flags
from tests.test_resume import final_checkpoint, wait_for
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import newest_complete
from vaegan_dist.exits import Ending


def test_sigusr1_saves_exits_75_and_requeues_the_slurm_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    out = tmp_path / "run"
    env = forked.default_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242")
    flags = tiny_flags(batch_size=16, log_every=1, requeue=True, output_dir=out)
    with forked.Forked("vaegan_dist.train", flags, tmp_path / "log.txt", env=env) as run:  # its own process
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
    assert "process 0 leaves" in result.stdout and "process 1 leaves" in result.stdout
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "process 1: OSError: [Errno 28] No space left on device" in outcome, outcome
        assert "process 0" not in outcome
    assert newest_complete(checkpoints_dir(tmp_path), report=print).name == "step_0000001"
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == "step_0000001\n"


def start_tiny_run(out, *, under_launcher=False, **settings):
    """A tiny run on its way once its first record is written: two processes under `accelerate launch`, or one
    process as `python -m vaegan_dist.train` runs, forked (tests/forked.py); its output goes to a file beside out."""
    flags = tiny_flags(batch_size=16, log_every=1, output_dir=out, **settings)
    if under_launcher:
        command, env = launch_command(flags, num_processes=2)
        run = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    else:
        run = forked.Forked("vaegan_dist.train", flags, out.parent / f"{out.name}.log")
    wait_for(lambda: (out / "metrics.jsonl").exists(), 120, "training to start")
    time.sleep(0.2)
    return run


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    with start_tiny_run(out) as run:
        try:
            run.send_signal(signal.SIGINT)
            output, _ = run.communicate(timeout=120)
        finally:
            run.kill()
    assert run.returncode == Ending.INTERRUPTED == 130, output[-3000:]
    assert output.count("Ctrl-C: stopping at the end of this step") == 1 and "Traceback" not in output
    assert "stopped by SIGINT" in output
    assert final_checkpoint(out).state["position"]["step"] > 0
    assert not (out / ".lock").exists()  # the output directory is free again


def test_a_second_ctrl_c_quits_at_once_saving_nothing(tmp_path, monkeypatch):
    """The first Ctrl-C asks for a save; a second one, before the step ends, quits without one."""
    import vaegan_dist.training.loop as train_module
    from vaegan_dist.cli.train import main

    def endless_save(*args, **kwargs):  # stands in for a save that takes long: the second Ctrl-C lands in it
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the second Ctrl-C did not stop the save")

    monkeypatch.setattr(train_module, "save_checkpoint", endless_save)
    before = signal.getsignal(signal.SIGINT)  # Python's Ctrl-C; SIG_IGN where pytest runs as a background job
    monkeypatch.setattr(train_module.PreemptionWatch, "requested", lambda self, accelerator: (
        os.kill(os.getpid(), signal.SIGINT) or self.received))
    with pytest.raises(SystemExit) as stopped:
        main(tiny_flags(max_steps=5, output_dir=tmp_path / "run"))
    assert stopped.value.code == Ending.INTERRUPTED
    assert not checkpoints_dir(tmp_path / "run").exists() and not (tmp_path / "run" / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is before  # pytest's own Ctrl-C is back


def test_ctrl_c_under_accelerate_launch_cuts_the_evaluation_short_and_saves_on_every_process(tmp_path):
    """A terminal's Ctrl-C reaches the launcher, which passes SIGINT on to its processes (torch elastic). It lands
    in an evaluation (one after every step, of 10,000 samples, some 10 s): the processes agree to end it within a
    batch, and save."""
    out = tmp_path / "run"
    with start_tiny_run(out, under_launcher=True, eval_every=1, eval_samples=10_000) as run:
        try:
            run.send_signal(signal.SIGINT)
            output, _ = run.communicate(timeout=120)
        finally:
            run.kill()
    assert "stopped by SIGINT" in output, output[-3000:]  # (the launcher then reports its own SignalException)
    checkpoint = final_checkpoint(out)
    step = checkpoint.state["position"]["step"]
    assert checkpoint.state["world_size"] == 2 and step > 0
    assert f"the evaluation at step {step} was cut short by the stop signal" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["step"] == step and "eval/fid" in r]


def test_a_repeated_sigterm_keeps_the_first_ones_exit_code():
    """SLURM's SIGTERM and the launcher's forwarded one arrive close together: the second may land after the save,
    when the watch is over, and must not turn exit 75 into 143 (killed)."""
    script = ("import os, signal, sys\n"
              "from vaegan_dist.training.preemption import PreemptionWatch\n"
              "with PreemptionWatch(print) as watch:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "assert watch.received == signal.SIGTERM\n"
              "os.kill(os.getpid(), signal.SIGTERM)  # after the watch: the save is done, the exit is under way\n"
              "sys.exit(75)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert result.returncode == 75, result.stderr


def test_a_closed_stdout_costs_no_save(tmp_path):
    """`train.py ... | tee log` and Ctrl-C: the terminal's Ctrl-C ends tee too. Here the reader closes the pipe
    after the first lines; the run prints on, finishes, checkpoints and exits 0."""
    out = tmp_path / "run"
    command, env = launch_command(tiny_flags(max_steps=30, log_every=1, output_dir=out))
    run = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while b"step " not in run.stdout.readline():
            pass
        run.stdout.close()  # the reader is gone
        _, err = run.communicate(timeout=180)
    finally:
        run.kill()
    assert run.returncode == 0, err.decode()[-3000:]
    assert (checkpoints_dir(out) / "step_0000030" / "COMPLETE").is_file()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_workers_whose_launcher_is_killed_stop_with_a_checkpoint(tmp_path):
    """kill -9 of `accelerate launch`: its two workers, orphaned, save at the next step boundary and exit, instead of
    training on to the end holding the output directory's lock."""
    import psutil

    from tests.test_resume import worker_pids

    out = tmp_path / "run"
    command, env = launch_command(tiny_flags(max_steps=100_000, log_every=1, output_dir=out), num_processes=2)
    with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as launcher:
        try:
            workers = [psutil.Process(pid) for pid in worker_pids(launcher, 2)]
            wait_for(lambda: (out / "metrics.jsonl").exists(), 120, "training to start")
            launcher.kill()
            _, alive = psutil.wait_procs(workers, timeout=60)
            output = launcher.stdout.read().decode()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
    assert not alive, output[-3000:]
    assert "the launcher (process" in output and "is gone: stopping with a checkpoint" in output, output[-3000:]
    assert 0 < final_checkpoint(out).state["position"]["step"] < 100_000
    assert not (out / ".lock").exists()


def test_ctrl_c_while_torch_loads_is_one_line():
    run = subprocess.Popen([sys.executable, "-m", "vaegan_dist.train", "--max-steps", "1"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Python's own Ctrl-C
    time.sleep(0.3)  # interpreter started, torch still loading
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == Ending.INTERRUPTED, err[-3000:]
    assert err.strip() == "stopped by Ctrl-C while starting: nothing was trained"
