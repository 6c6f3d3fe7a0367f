"""--tracker: TensorBoard event files with the records W&B gets, read back with TensorBoard's own reader; a
writer that fails or hangs never costs the training step more than a warning."""

from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import launch, tiny_flags
from vaegan_dist.cli.train import parse_args
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.training.queued_worker import MAX_PENDING
from vaegan_dist.training.tensorboard import TENSORBOARD_DIR, TensorBoardTracker
from vaegan_dist.training.trackers import Trackers


def events(directory) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_records_are_scalars_against_step_and_grids_are_images(tmp_path):
    warnings: list[str] = []
    tracker = TensorBoardTracker(warnings.append)
    tracker.start(tmp_path, {"latent_dim": 4})
    assert tracker.active and tracker.location == str(tmp_path / TENSORBOARD_DIR)
    for step in (5, 10):
        tracker.log({"step": step, "epoch": 0, "enc_loss": 1.0 / step, "eval/fid": 3.5})
    grid = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    tracker.log({"step": 10, "samples": grid, "reconstructions": grid[:, :, 0]})
    tracker.finish()
    assert warnings == []
    accumulator = events(tmp_path / TENSORBOARD_DIR)
    assert [(e.step, e.value) for e in accumulator.Scalars("enc_loss")] == [(5, pytest.approx(0.2)),
                                                                            (10, pytest.approx(0.1))]
    assert [e.step for e in accumulator.Scalars("eval/fid")] == [5, 10]
    [samples] = accumulator.Images("samples")
    assert (samples.step, samples.width, samples.height) == (10, 30, 20)
    [recon] = accumulator.Images("reconstructions")
    assert (recon.width, recon.height) == (30, 20)


def test_a_resumed_run_hides_what_the_crashed_job_logged_past_its_checkpoint(tmp_path):
    """The first job logs steps 1-10 and crashes; its checkpoint was at step 6: the resumed job logs 7-10 again,
    and TensorBoard shows each step once, the resumed job's values."""
    for start, steps, value in ((0, range(1, 11), 1.0), (6, range(7, 11), 2.0)):
        tracker = TensorBoardTracker(print)
        tracker.start(tmp_path, {"latent_dim": 4}, start)
        for step in steps:
            tracker.log({"step": step, "train/enc_loss": value})
        tracker.finish()
        time.sleep(1.1)  # event files are named by the second they were opened in
    scalars = events(tmp_path / TENSORBOARD_DIR).Scalars("train/enc_loss")
    assert [(e.step, e.value) for e in scalars] == [(s, 1.0) for s in range(1, 7)] + [(s, 2.0) for s in range(7, 11)]


def test_a_full_disk_is_one_warning_and_logging_stops_without_raising(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "flush", no_space)
    monkeypatch.setattr(SummaryWriter, "close", no_space)
    warnings: list[str] = []
    tracker = TensorBoardTracker(warnings.append)
    tracker.start(tmp_path, {"latent_dim": 4})
    for step in range(20):
        tracker.log({"step": step, "loss": 1.0})
    tracker.finish()
    assert warnings == ["TensorBoard logging failed ([Errno 28] No space left on device); training goes on "
                        "without it"]


def test_a_hung_writer_never_blocks_logging_and_finish_is_bounded(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    release = threading.Event()
    monkeypatch.setattr(SummaryWriter, "add_scalar", lambda *args, **kwargs: release.wait())
    warnings: list[str] = []
    tracker = TensorBoardTracker(warnings.append)
    tracker.start(tmp_path, {"latent_dim": 4})
    started = time.perf_counter()
    for step in range(3 * MAX_PENDING):
        tracker.log({"step": step, "loss": 1.0})
    assert time.perf_counter() - started < 1
    assert len(warnings) == 1 and "TensorBoard is not keeping up" in warnings[0]
    tracker.finish(timeout=0.3)
    assert "did not finish writing within 0.3 s" in warnings[-1]
    release.set()


def test_tracker_settings():
    assert TrainConfig().tracker == "wandb"
    for value in ("wandb", "tensorboard", "none", "wandb,tensorboard", "tensorboard,wandb"):
        assert parse_args(["--tracker", value]).tracker == value
    for bad in ("tensorbord", "wandb,none", "wandb,wandb", ""):
        with pytest.raises(ConfigError, match="setting 'tracker'"):
            TrainConfig(tracker=bad)
    assert Trackers("none", print).location == "not used (--tracker)" and not Trackers("none", print).active
    both = Trackers("wandb,tensorboard", print)
    assert both.wandb is not None and both.tensorboard is not None and both.mode == "disabled"


def test_a_two_process_run_writes_one_event_file_with_the_records_of_metrics_jsonl(tmp_path):
    result = launch(tiny_flags(max_steps=10, log_every=5, image_every=5, output_dir=tmp_path,
                               tracker="wandb,tensorboard"), num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1  # the main process alone
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accumulator = events(tmp_path / TENSORBOARD_DIR)
    for key in ("enc_loss", "dec_loss", "dis_loss", "d_x", "images_per_s"):
        assert [(e.step, e.value) for e in accumulator.Scalars(f"train/{key}")] == [
            (r["step"], pytest.approx(r[key], rel=1e-6)) for r in records if key in r]
    (settings,) = accumulator.Tensors("config/text_summary")
    assert "| latent_dim | 4 |" in settings.tensor_proto.string_val[0].decode()
    assert {"samples", "reconstructions"} <= set(accumulator.Tags()["images"]), accumulator.Tags()["images"]
    assert [e.step for e in accumulator.Images("samples")] == [5, 10]
    assert "warning" not in result.stderr.lower()
