"""A run owns its output directory, and its metrics.jsonl ends where its checkpoint resumed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import tiny_flags
from tests.test_preemption import start_tiny_run
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.metrics_log import MetricsLog
from vaegan_dist.cli.train import main
from vaegan_dist.exits import EXIT_BAD_INPUT
from vaegan_dist.training import output_lock as run_lock
from vaegan_dist.training.output_lock import LockHeld, OutputLock


def write_lock(directory, **holder):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / run_lock.LOCK_FILE).write_text(json.dumps(holder))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_run_on_the_same_output_dir_stops_and_names_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    with start_tiny_run(out) as first:
        try:
            with pytest.raises(SystemExit) as second:
                main(tiny_flags(max_steps=3, output_dir=out))
            assert second.value.code == EXIT_BAD_INPUT
            error = capsys.readouterr().err
            assert error.startswith(f"error: {out} is in use by another run: process {first.pid} on ")
            assert len(error.splitlines()) == 1
            assert first.poll() is None  # the first run goes on
        finally:
            first.kill()
            first.communicate()


def test_the_lock_of_a_run_that_died_here_is_taken_over(tmp_path):
    out = tmp_path / "run"
    write_lock(out, host=run_lock.socket.gethostname(), pid=dead_pid(), started="earlier")
    with pytest.raises(SystemExit) as finished:
        main(tiny_flags(max_steps=2, output_dir=out))
    assert finished.value.code == 0 and checkpoints_dir(out).is_dir()
    assert not (out / run_lock.LOCK_FILE).exists()  # released at the end


def taken_once_stale(directory) -> OutputLock:
    """The lock in directory, aged past STALE_AFTER_S, then taken by a new OutputLock."""
    stale = time.time() - run_lock.STALE_AFTER_S - 1
    os.utime(directory / run_lock.LOCK_FILE, (stale, stale))
    lock = OutputLock(directory)
    lock.acquire()
    return lock


def test_another_hosts_lock_holds_until_it_falls_silent(tmp_path, monkeypatch):
    write_lock(tmp_path, host="elsewhere", pid=1, slurm_job_id="7", started="then")
    with pytest.raises(LockHeld, match=r"process 1 on elsewhere \(SLURM job 7\), started then"):
        OutputLock(tmp_path).acquire()
    lock = taken_once_stale(tmp_path)
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch):
    write_lock(tmp_path, host="other-node", pid=1, slurm_job_id="4242", started="before the requeue")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = OutputLock(tmp_path)
    lock.acquire()
    lock.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["torn", "own pid"])
def test_a_torn_lock_or_one_naming_this_process_is_judged_by_its_age(tmp_path, kind):
    """A full disk leaves an empty lock; a restarted container reuses the pid a lock names: neither is a run."""
    if kind == "torn":
        tmp_path.joinpath(run_lock.LOCK_FILE).write_text("")
        found = "holds a lock that cannot be read"
    else:
        write_lock(tmp_path, host=run_lock.socket.gethostname(), pid=os.getpid(), started="before the restart")
        found = "holds a lock naming this very process"
    with pytest.raises(LockHeld, match=rf"{found} .*last touched 0 s ago: it is taken over once 300 s pass"):
        OutputLock(tmp_path).acquire()
    taken_once_stale(tmp_path).release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_lock_torn_by_its_own_run_is_released(tmp_path):
    lock = OutputLock(tmp_path)
    lock.acquire()
    lock.path.write_text("")  # the disk filled up under the holder
    lock.release()
    assert not lock.path.exists()


def test_the_lock_is_touched_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = OutputLock(tmp_path)
    lock.acquire()
    old = time.time() - 100
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_after_a_crash_the_log_ends_where_the_checkpoint_resumed(tmp_path):
    out = tmp_path / "run"
    flags = dict(log_every=1, save_every=5, output_dir=out)
    with pytest.raises(SystemExit):
        main(tiny_flags(max_steps=8, **flags))
    shutil.rmtree(checkpoints_dir(out) / "step_0000008")  # as if the run died after logging step 8, unsaved
    (checkpoints_dir(out) / "latest").write_text("step_0000005\n")
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"step": 9, "enc_lo')  # and a torn last line from a full disk
    with pytest.raises(SystemExit) as resumed:
        main(tiny_flags(max_steps=10, **flags))
    assert resumed.value.code == 0
    assert [record["step"] for record in records(out)] == list(range(1, 11))


def test_a_failed_write_leaves_no_torn_line_and_warns_once(tmp_path, monkeypatch):
    warnings = []
    log = MetricsLog(tmp_path / "metrics.jsonl", True, warnings.append)
    log.write({"step": 1})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    log.write({"step": 2})
    log.write({"step": 3})
    monkeypatch.setattr(os, "write", real_write)
    log.write({"step": 4})
    assert [record["step"] for record in records(tmp_path)] == [1, 4]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
