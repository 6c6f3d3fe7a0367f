"""What version 0.4 wrote still loads: a checkpoint of a tiny run (tests/data/v0.4/run, 2 steps with moving
averages) resumes, and it and its export (tests/data/v0.4/export, vaegan-export's float16) read as networks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import Accelerator

from tests.conftest import REPO
from vaegan_dist import VAEGAN
from vaegan_dist.checkpoint.layout import CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.policy import config_changes
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, verify
from vaegan_dist.config import TrainConfig
from vaegan_dist.hub.network_files import load_networks
from vaegan_dist.training.loop import train

V04 = REPO / "tests" / "data" / "v0.4"
CHECKPOINT = V04 / "run" / "checkpoints" / "step_0000002"


def test_a_0_4_checkpoint_verifies_and_resumes(tmp_path, capsys):
    assert verify(CHECKPOINT) is None
    run = shutil.copytree(V04 / "run", tmp_path / "run")
    settings = {**json.loads((CHECKPOINT / "config.json").read_text()), "output_dir": str(run), "max_steps": 3}
    assert train(TrainConfig.from_dict(settings), Accelerator(cpu=True)) == 0
    assert f"resume: from {run / 'checkpoints' / 'step_0000002'} (step 2" in capsys.readouterr().out
    newest = Checkpoint(newest_complete(checkpoints_dir(run), report=print))
    assert newest.state["position"]["step"] == 3 and newest.state["skipped_steps"] == 0


def test_a_0_4_checkpoint_and_its_export_load_as_the_same_networks():
    saved = Checkpoint(CHECKPOINT)
    _, encoder, decoder = load_networks(CHECKPOINT)  # the moving averages, as the export was made
    for name, network in (("encoder_ema", encoder), ("decoder_ema", decoder)):
        assert all(torch.equal(network.state_dict()[key], value) for key, value in saved.network(name).items()), name
    model = VAEGAN.from_pretrained(V04 / "export")
    for name, network in (("encoder", encoder), ("decoder", decoder)):
        exported = getattr(model, name).state_dict()
        assert all(torch.equal(exported[key], value.half().float()) for key, value in network.state_dict().items())
    assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)


def test_a_0_4_checkpoint_is_an_mlp_one_and_other_images_are_refused_in_one_line(tmp_path):
    run = shutil.copytree(V04 / "run", tmp_path / "run")
    settings = {**json.loads((CHECKPOINT / "config.json").read_text()), "output_dir": str(run), "max_steps": 3}
    with pytest.raises(CheckpointError, match="setting 'architecture' is 'conv' but the checkpoint was trained with "
                                              "'mlp'"):
        train(TrainConfig.from_dict({**settings, "architecture": "conv"}), Accelerator(cpu=True))
    folder = {**settings, "dataset": "folder", "data_dir": str(tmp_path), "image_size": 32}
    with pytest.raises(CheckpointError, match=r"the images are \(3, 32, 32\) .* trained on \(1, 28, 28\)"):
        train(TrainConfig.from_dict(folder), Accelerator(cpu=True))
    changes = list(config_changes(json.loads((CHECKPOINT / "config.json").read_text()),
                                  TrainConfig.from_dict({**settings, "image_size": 28, "channels": 1})))
    assert changes == []  # none and 28, none and 1: MNIST's shape alike
