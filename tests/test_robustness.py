"""Bad input, divergence and failing saves: each a clear one-line error or warning, and no work lost."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

import vaegan_dist.checkpoint.writing as checkpoint_module
from tests.conftest import REPO, tiny_config
from tests.test_resume import final_checkpoint
from vaegan_dist.checkpoint.layout import CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.writing import save_checkpoint
from vaegan_dist.config import ConfigError
from vaegan_dist.data import mnist as data
from vaegan_dist.data.mnist import DataError
from vaegan_dist.exits import Ending
from vaegan_dist.model.networks import build_models
from vaegan_dist.training.loop import train
from vaegan_dist.training.metrics import MetricWindow, discriminator_collapsed
from vaegan_dist.training.state import Position, TrainState


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def run(accelerator, tmp_path, **settings):
    return train(tiny_config(output_dir=str(tmp_path), **settings), accelerator)


def test_a_batch_larger_than_the_training_set(accelerator, tmp_path):
    with pytest.raises(ConfigError, match="batch_size' 70000 × 1 processes exceeds the 60000 training images"):
        run(accelerator, tmp_path, batch_size=70000)


def test_a_missing_data_directory_offline(accelerator, tmp_path, monkeypatch):
    def offline(folder):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError, match=r"not found in .*nothing, and downloading it failed"):
        run(accelerator, tmp_path, data_dir=str(tmp_path / "nothing"))


def test_an_output_directory_that_cannot_be_written(accelerator, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write to output directory .*a_file/run .*writable --output-dir"):
        run(accelerator, tmp_path / "a_file" / "run")


def test_bad_resumes(accelerator, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        run(accelerator, tmp_path, resume=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a usable checkpoint: it has no COMPLETE marker"):
        run(accelerator, tmp_path, resume=str(tmp_path / "empty"))
    assert run(accelerator, tmp_path, max_steps=1) == 0
    with pytest.raises(CheckpointError, match="setting 'latent_dim' is 8 but the checkpoint was trained with 4"):
        run(accelerator, tmp_path, max_steps=2, latent_dim=8)


def disk_full_for(step_name):
    real = checkpoint_module._fsync_write

    def write(path, data):
        if step_name in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    return write


def test_a_failed_periodic_save_stops_the_run_and_keeps_the_previous_checkpoint(accelerator, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_fsync_write", disk_full_for("step_0000004"))
    with pytest.raises(CheckpointError, match="No space left on device"):
        run(accelerator, tmp_path, save_every=2, max_steps=5)
    assert final_checkpoint(tmp_path).path.name == "step_0000002"


def test_on_save_error_continue_warns_and_keeps_training(accelerator, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_module, "_fsync_write", disk_full_for("step_0000002"))
    assert run(accelerator, tmp_path, save_every=2, max_steps=3, on_save_error="continue") == 0
    assert "warning: writing checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints_dir(tmp_path).glob("step_*")) == ["step_0000003"]


def test_a_diverged_run_names_a_checkpoint_from_before_it_keeps_it_and_saves_no_bad_one(accelerator, tmp_path,
                                                                                       capsys, monkeypatch):
    """From step 4 every batch holds a NaN, so every step is skipped; --max-consecutive-skips 3 of them end the run
    with exit code 4. No checkpoint holds the weights they kept (step 3's; none at step 4 or 6 either); step 2's is
    linked as last_good and survives the pruning of later runs; resumed from it (the data fine again), it trains."""
    import vaegan_dist.training.loop as loop

    calls = {"n": 0}
    real = loop.images_to_pixels

    def nan_from_step_4(batch):
        calls["n"] += 1
        pixels = real(batch)
        return torch.full_like(pixels, math.nan) if calls["n"] >= 4 else pixels

    monkeypatch.setattr(loop, "images_to_pixels", nan_from_step_4)
    assert run(accelerator, tmp_path, max_consecutive_skips=3, log_every=1, save_every=2,
               keep_last=1) == Ending.DIVERGED == 4
    err = capsys.readouterr().err
    good = checkpoints_dir(tmp_path) / "step_0000002"
    assert ("error: the run diverged: the 3 steps from step 4 on were all skipped (non-finite losses or gradients) "
            f"with the weights of step 3, of which no checkpoint is written. {good} is kept as checkpoints/last_good, "
            f"safe from pruning: resume from it with a lower --lr (or --gamma): --resume {good} --lr") in err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 3)]
    assert sorted(p.name for p in checkpoints_dir(tmp_path).glob("step_*")) == ["step_0000002"]
    assert (checkpoints_dir(tmp_path) / "last_good").resolve() == good.resolve()
    monkeypatch.setattr(loop, "images_to_pixels", real)
    last_good = checkpoints_dir(tmp_path) / "last_good"  # the link itself, as --resume takes it
    assert run(accelerator, tmp_path, resume=str(last_good), lr=1e-4, max_steps=6, save_every=2, keep_last=1) == 0
    assert sorted(p.name for p in checkpoints_dir(tmp_path).glob("step_*")) == ["step_0000002", "step_0000006"]
    assert final_checkpoint(tmp_path).state["skipped_steps"] == 0  # the resumed branch skipped none


def test_weights_that_are_not_finite_are_never_checkpointed(accelerator, tmp_path):
    config = tiny_config(output_dir=str(tmp_path))
    networks, optimizers = build_models(config), None
    with torch.no_grad():
        next(networks.decoder.parameters()).view(-1)[0] = math.inf
    state = TrainState(Position(step=1), MetricWindow(torch.device("cpu")))
    with pytest.raises(CheckpointError, match="the weights of decoder at step 1 are not finite: not saved"):
        save_checkpoint(accelerator, tmp_path, config, networks, optimizers, state)
    assert not checkpoints_dir(tmp_path).exists() or not any(checkpoints_dir(tmp_path).iterdir())


def test_discriminator_collapse_is_both_outputs_stuck_at_the_ends():
    assert discriminator_collapsed({"d_x": 0.999, "d_x_tilde": 0.001})  # D wins outright
    assert discriminator_collapsed({"d_x": 0.002, "d_x_tilde": 0.995})
    assert not discriminator_collapsed({"d_x": 0.999, "d_x_tilde": 0.3})
    assert not discriminator_collapsed({"d_x": 0.6, "d_x_tilde": 0.4})


@pytest.mark.parametrize(("flags", "code", "message"), [
    (["--resume", "/nonexistent/ckpt"], 3, "error: --resume /nonexistent/ckpt: no such file or directory"),
    (["--batch-size", "0"], 2, "error: setting 'batch_size' must be positive"),
])
def test_the_command_line_prints_one_line_and_no_traceback(tmp_path, flags, code, message):
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.train", "--output-dir", str(tmp_path), *flags],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == code
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_missing_classifier_turns_evaluation_off_with_one_warning(accelerator, tmp_path, monkeypatch, capsys):
    import vaegan_dist.evaluation.scores as evaluation

    def missing(device):
        raise DataError("the classifier weights vaegan_dist/classifier.safetensors are missing: restore them")

    monkeypatch.setattr(evaluation, "load_classifier", missing)
    assert run(accelerator, tmp_path, max_steps=2, eval_samples=100, eval_every=1) == 0
    err = capsys.readouterr().err
    assert err.count("warning: evaluation is off for this run: the classifier weights") == 1


def test_a_failing_evaluation_warns_each_time_and_training_goes_on(accelerator, tmp_path, monkeypatch, capsys):
    import vaegan_dist.training.loop as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_module, "evaluate_distributed", broken)
    assert run(accelerator, tmp_path, max_steps=3, eval_samples=100, eval_every=1) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the evaluation at step") == 3 and "RuntimeError: out of memory" in err
    assert final_checkpoint(tmp_path).state["position"]["step"] == 3


def test_a_rerun_with_nothing_left_to_train_says_so_and_changes_no_file(accelerator, tmp_path, capsys):
    assert run(accelerator, tmp_path, max_steps=3) == Ending.FINISHED
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert run(accelerator, tmp_path, max_steps=2, lr=1e-3) == Ending.FINISHED
    assert f"nothing to train: {tmp_path} stands at step 3" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == files  # config.json still holds the settings that trained
