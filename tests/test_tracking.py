"""W&B logging: an offline run read back from its own files, the outage test, and a service that hangs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import wandb
from PIL import Image

from tests import forked
from tests.conftest import launch, tiny_flags
from tests.wandb_files import history, run_info
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.exits import Ending
from vaegan_dist.training.console import plain_line
from vaegan_dist.training.queued_worker import MAX_PENDING
from vaegan_dist.training.trackers import WandbTracker, resolve_mode

FAKE_KEY = "x" * 40  # a well-formed API key that no server knows


def no_credentials(tmp_path: Path) -> dict[str, str]:
    """Environment that hides any W&B login of this machine from a run."""
    return {"NETRC": str(tmp_path / "netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_two_process_run_is_one_run_holding_every_record_and_the_grids(tmp_path):
    # 14 steps per epoch: grids go to W&B at steps 7 and 14 (the end of epoch 1) and 16 (the last step).
    out = tmp_path / "run"
    env = {**no_credentials(tmp_path), "WANDB_PROJECT": "vaegan-test", "WANDB_RUN_GROUP": "sweep-1",
           "WANDB_TAGS": "ci,tiny"}
    result = launch([*tiny_flags(global_batch_size=4096, max_steps=16, log_every=5, image_every=7,
                                 output_dir=out), "--wandb", "offline"], num_processes=2, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    (run_dir,) = (out / "wandb").glob("offline-run-*")  # one run for the job, not one per process
    assert f"wandb sync {run_dir}" in result.stdout
    run = run_info(run_dir)
    assert (run.project, run.run_group, list(run.tags)) == ("vaegan-test", "sweep-1", ["ci", "tiny"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["latent_dim"], config["global_batch_size"], config["num_processes"]) == (4, 4096, 2)

    records = read_metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 16]
    # stdout is a pipe, as in a SLURM log: the table, then a plain line per record, and no escape codes.
    assert "2 processes on 1 node, cpu" in result.stdout and "\x1b" not in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("step ")] == [
        plain_line(r) for r in records]
    for record in records:
        assert record["peak_memory_mb"] > 0 and record["lr_encoder"] == config["lr"]
    rows = history(run_dir)
    scalar_rows = [row for row in rows if "train/enc_loss" in row]
    assert len(scalar_rows) == len(records)
    for row, record in zip(scalar_rows, records, strict=True):
        assert {key: row[key if key == "step" else f"train/{key}"] for key in record} == pytest.approx(record)

    image_rows = [row for row in rows if "samples/path" in row]
    assert [row["step"] for row in image_rows] == [7, 14, 16]
    for row in image_rows:
        for name in ("samples", "reconstructions"):
            pixels = np.asarray(Image.open(run_dir / "files" / row[f"{name}/path"]).convert("L"))
            assert pixels.shape == (242, 242) and pixels.max() > 128  # uint8 in: not black
    for step, tag in ((14, "epoch_001"), (16, "step_0000016")):  # the same pictures as the PNG files
        (row,) = [r for r in image_rows if r["step"] == step]
        for name in ("samples", "reconstructions"):
            logged = Image.open(run_dir / "files" / row[f"{name}/path"]).convert("L")
            saved = Image.open(out / name / f"{tag}.png").convert("L")
            assert np.array_equal(np.asarray(logged), np.asarray(saved))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_outage_is_one_warning_and_training_finishes(tmp_path):
    env = {**no_credentials(tmp_path), "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
           "WANDB_API_KEY": FAKE_KEY}
    result = launch([*tiny_flags(max_steps=4, log_every=2, output_dir=tmp_path / "run"), "--wandb", "online",
                     "--wandb-timeout", "3"], env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]
    assert "W&B (online)" in result.stdout and "failed to start" in result.stdout
    assert "warning" not in result.stdout.lower() and "wandb:" not in result.stdout
    lines = result.stderr.strip().splitlines()  # wandb's own messages are silenced
    assert len(lines) == 1 and lines[0].startswith("warning: W&B did not start ("), result.stderr


class FakeRun:
    """A wandb run whose log calls block until `release` is set, or raise."""

    def __init__(self, tmp_path: Path, log_error: Exception | None = None) -> None:
        self.id, self.url, self.dir = "fake", "http://wandb.invalid/fake", str(tmp_path / "run" / "files")
        self.release = threading.Event()
        self.log_error = log_error
        self.logged: list[dict] = []
        self.finished = False

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, values: dict) -> None:
        if self.log_error:
            raise self.log_error
        self.release.wait()
        self.logged.append(values)

    def finish(self, exit_code: int = 0) -> None:
        self.finished = True
        self.exit_code = exit_code

    def mark_preempting(self) -> None:
        self.preempting = not self.finished


def start_tracker(monkeypatch, tmp_path, init, timeout=5.0) -> tuple[WandbTracker, list[str]]:
    monkeypatch.setattr(wandb, "init", init)
    warnings: list[str] = []
    tracker = WandbTracker(warnings.append)
    tracker.start("online", {}, tmp_path, run_id=None, timeout=timeout)
    return tracker, warnings


def test_an_init_that_never_answers_fails_after_the_timeout(monkeypatch, tmp_path):
    never = threading.Event()
    started = time.perf_counter()
    tracker, warnings = start_tracker(monkeypatch, tmp_path, lambda **kwargs: never.wait(), timeout=0.5)
    assert time.perf_counter() - started < 5
    assert warnings == ["W&B did not start (no answer within 0.5 s (--wandb-timeout)); "
                        "training goes on with local logs only"]
    assert not tracker.active and tracker.run_id is None
    tracker.log({"step": 1})
    tracker.finish()
    assert len(warnings) == 1
    never.set()


def test_a_hung_service_never_blocks_logging_and_finish_is_bounded(monkeypatch, tmp_path):
    run = FakeRun(tmp_path)
    tracker, warnings = start_tracker(monkeypatch, tmp_path, lambda **kwargs: run, timeout=0.5)
    assert tracker.active and tracker.run_id == "fake"
    started = time.perf_counter()
    for step in range(3 * MAX_PENDING):
        tracker.log({"step": step, "loss": 1.0})
    assert time.perf_counter() - started < 1
    assert len(warnings) == 1 and "W&B is not keeping up" in warnings[0]
    tracker.finish()
    assert len(warnings) == 2 and "did not finish within 0.5 s" in warnings[1]
    run.release.set()  # the service recovers: what was queued is logged, then the run finishes
    deadline = time.perf_counter() + 10
    while not run.finished and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert run.finished and 0 < len(run.logged) <= MAX_PENDING + 1


def test_a_failing_log_call_is_one_warning_and_the_run_still_finishes(monkeypatch, tmp_path):
    run = FakeRun(tmp_path, log_error=ConnectionError("service went away\nmore detail"))
    tracker, warnings = start_tracker(monkeypatch, tmp_path, lambda **kwargs: run)
    for step in range(5):
        tracker.log({"step": step, "grid": np.zeros((4, 4, 3), np.uint8)})
    tracker.finish()
    assert warnings == ["W&B logging failed (service went away); training goes on with local logs only"]
    assert run.finished


@pytest.mark.parametrize("ending", list(Ending), ids=lambda e: e.name)
def test_only_a_preempted_run_is_marked_preempting_so_a_sweep_hands_it_out_again(monkeypatch, tmp_path, ending):
    run = FakeRun(tmp_path)
    run.release.set()
    tracker, _ = start_tracker(monkeypatch, tmp_path, lambda **kwargs: run)
    tracker.finish(ending)
    assert run.finished and run.exit_code == ending
    assert getattr(run, "preempting", False) == (ending == Ending.PREEMPTED)


def test_a_resumed_job_continues_its_run(monkeypatch, tmp_path):
    """Two jobs given the run id of the checkpoint: one W&B run, its step axis going on from the checkpoint."""
    for job, step in enumerate((10, 20)):
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"job{job}"))  # respected over the output directory
        (tmp_path / f"job{job}").mkdir()
        tracker = WandbTracker(pytest.fail)
        tracker.start("offline", {}, tmp_path / "output", run_id="resumed-run-1", timeout=30)
        assert tracker.run_id == "resumed-run-1"
        tracker.log({"step": step, "loss": 1 / step})
        tracker.finish()
    run_dirs = [next((tmp_path / f"job{job}" / "wandb").glob("offline-run-*")) for job in range(2)]
    assert [run_info(d).run_id for d in run_dirs] == ["resumed-run-1"] * 2
    assert [[row["step"] for row in history(d)] for d in run_dirs] == [[10], [20]]
    assert not (tmp_path / "output").exists()


def test_a_job_resumed_from_its_checkpoint_continues_the_w_and_b_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, **no_credentials(tmp_path), "OMP_NUM_THREADS": "1"}

    def train(max_steps: int) -> None:  # a process of its own, forked (tests/forked.py)
        result = forked.run("vaegan_dist.train", [*tiny_flags(max_steps=max_steps, log_every=5, save_every=5,
                                                              output_dir=out), "--wandb", "offline"],
                            tmp_path / "logs", env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    train(10)
    (first,) = (out / "wandb").glob("offline-run-*")
    run_id = run_info(first).run_id
    assert json.loads((out / "checkpoints" / "step_0000010" / "state.json").read_text())["wandb_run_id"] == run_id
    train(20)  # the same command with a longer run: resumes from step 10
    (second,) = set((out / "wandb").glob("offline-run-*")) - {first}
    assert run_info(second).run_id == run_id
    assert [row["step"] for row in history(second) if "train/enc_loss" in row] == [15, 20]


def test_auto_is_online_with_a_key_offline_without_and_follows_wandb_mode(monkeypatch, tmp_path):
    for name, value in no_credentials(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")  # wandb login
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"  # the flag wins over the environment


@pytest.mark.parametrize(("setting", "message"), [
    ({"wandb": "maybe"}, "setting 'wandb' is 'maybe': choose one of auto, online, offline, disabled"),
    ({"wandb_timeout": 0}, "setting 'wandb_timeout' must be positive"),
    ({"image_every": 0}, "setting 'image_every' must be positive"),
])
def test_bad_wandb_settings_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**setting)
