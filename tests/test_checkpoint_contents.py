"""Checkpoints whose files verify but whose contents do not: each one is damaged, like a SHA-256 mismatch (one line,
then the previous checkpoint, under --resume auto; an error when named by path)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_config
from vaegan_dist.checkpoint.layout import MARKER, CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.reading import resolve_resume, verify
from vaegan_dist.training.loop import train

TINY_RUN = dict(hidden_dim=16, depth=2, max_steps=2, save_every=1, ema_decay=0.9)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, accelerator):
    """A tiny run's output directory with checkpoints at steps 1 and 2."""
    output_dir = tmp_path_factory.mktemp("pristine")
    assert train(tiny_config(output_dir=str(output_dir), **TINY_RUN), accelerator) == 0
    return output_dir


@pytest.fixture
def run(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "run")


def reseal(checkpoint):
    """Rewrites COMPLETE with the SHA-256 of the files as they are now: they verify, whatever they hold."""
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(checkpoint.iterdir())
              if p.name != MARKER}
    (checkpoint / MARKER).write_text(json.dumps({"sha256": hashes}))


def edit_state(checkpoint, change):
    state = json.loads((checkpoint / "state.json").read_text())
    change(state)
    (checkpoint / "state.json").write_text(json.dumps(state))


def edit_tensors(checkpoint, file, change):
    tensors = load_file(checkpoint / file)
    change(tensors)
    save_file(tensors, checkpoint / file)


def first_weight(tensors):
    return next(key for key in sorted(tensors) if key.endswith("weight"))


def delete(key):
    return lambda d: d.pop(key)


def put(key, value):
    return lambda d: d.__setitem__(key, value)


def position(**values):
    return lambda state: state["position"].update(values)


DAMAGE = {  # name: (file, how, what the one line says)
    "no position": ("state.json", delete("position"), "state.json has no 'position'"),
    "skipped steps a string": ("state.json", put("skipped_steps", "0"), "'skipped_steps' is '0', not int"),
    "world size a float": ("state.json", put("world_size", 1.0), "'world_size' is 1.0, not int"),
    "negative step": ("state.json", position(step=-2), "is not three counts >= 0"),
    "step of another checkpoint": ("state.json", position(step=7), "step 7 is not the directory's"),
    "more epochs than steps": ("state.json", position(epoch=5), "inconsistent"),
    "step a bool": ("state.json", position(step=True), "not three counts"),
    "more skips than steps": ("state.json", put("skipped_steps", 3), "skipped_steps 3 or world_size 1 is impossible"),
    "digests of two processes": ("state.json", lambda s: s["replica_digests"].append("0" * 64),
                                 "replica_digests do not agree"),
    "digest of other weights": ("state.json", put("replica_digests", ["0" * 64]),
                                "do not hash to the replicas' digests"),
    "state not an object": ("state.json", None, "state.json is not a JSON object"),
    "weight of the wrong shape": ("decoder.safetensors", lambda t: t.__setitem__(first_weight(t), torch.zeros(3, 3)),
                                  "the networks need torch.float32"),
    "weight of the wrong dtype": ("encoder.safetensors",
                                  lambda t: t.__setitem__(first_weight(t), t[first_weight(t)].double()),
                                  "is torch.float64"),
    "a NaN weight": ("discriminator.safetensors",
                     lambda t: t[first_weight(t)].view(-1).__setitem__(0, float("nan")), "is not finite"),
    "an infinite average": ("encoder_ema.safetensors",
                            lambda t: t[first_weight(t)].view(-1).__setitem__(0, float("inf")), "is not finite"),
    "a changed weight": ("decoder.safetensors", lambda t: t[first_weight(t)].view(-1).__setitem__(0, 0.125),
                         "do not hash to the replicas' digests"),
    "a missing weight": ("encoder.safetensors", lambda t: t.pop(first_weight(t)), "encoder.safetensors lacks"),
    "an extra weight": ("encoder.safetensors", lambda t: t.__setitem__("extra.weight", torch.zeros(1)),
                        "which the networks of config.json do not"),
    "moment of the wrong shape": ("optimizers.safetensors", put("decoder.0.exp_avg", torch.zeros(2)),
                                  "decoder.0.exp_avg is torch.float32 (2,)"),
    "a NaN moment": ("optimizers.safetensors", put("encoder.1.exp_avg_sq", torch.full((16,), float("nan"))),
                     "is not finite"),
    "a negative second moment": ("optimizers.safetensors", put("encoder.1.exp_avg_sq", torch.full((16,), -1.0)),
                                 "negative step count or second moment"),
    "a missing step count": ("optimizers.safetensors", delete("discriminator.0.step"), "lacks discriminator.0.step"),
    "no window in the rank file": ("rank_0.safetensors", delete("window.terms"), "window.terms is missing"),
    "no rank file": ("rank_0.safetensors", None, "rank_0.safetensors is missing"),
    "a config that does not load": ("config.json", None, "its config.json is not usable"),
    "a config of other networks": ("config.json", None, "the networks need"),
    "a state.json that is not JSON": ("state.json", None, "its contents cannot be read (JSONDecodeError"),
}


def damage(checkpoint, name):
    file, how, _ = DAMAGE[name]
    path = checkpoint / file
    if name == "state not an object":
        path.write_text("[1, 2]")
    elif name == "no rank file":
        path.unlink()
    elif name == "a config that does not load":
        path.write_text(json.dumps({**json.loads(path.read_text()), "gama": 1}))
    elif name == "a config of other networks":
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_dim": 8}))
    elif name == "a state.json that is not JSON":
        path.write_text("{")
    elif file.endswith(".json"):
        edit_state(checkpoint, how)
    else:
        edit_tensors(checkpoint, file, how)
    reseal(checkpoint)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_checkpoint_whose_contents_are_wrong_is_damaged(run, name):
    older, newer = sorted(checkpoints_dir(run).glob("step_*"))
    assert verify(newer) is None
    damage(newer, name)
    lines = []
    assert resolve_resume("auto", run, lines.append) == older  # one line, then the previous one
    assert len(lines) == 1 and str(newer) in lines[0] and DAMAGE[name][2] in lines[0], lines
    with pytest.raises(CheckpointError, match="not a usable checkpoint") as error:  # named by path: an error
        resolve_resume(str(newer), run, lines.append)
    assert DAMAGE[name][2] in str(error.value)


def test_a_resumed_run_skips_a_damaged_newest_checkpoint_with_one_warning(run, accelerator, capsys):
    older, newer = sorted(checkpoints_dir(run).glob("step_*"))
    damage(newer, "a NaN weight")
    assert train(tiny_config(output_dir=str(run), **{**TINY_RUN, "max_steps": 3}), accelerator) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: skipping checkpoint") == 1 and "is not finite" in err
    assert f"resume: from {older} (step 1" in out + err
    assert verify(checkpoints_dir(run) / "step_0000003") is None


def test_resuming_with_spectral_norm_toggled_is_an_error_naming_the_setting(run, accelerator):
    with pytest.raises(CheckpointError, match="setting 'spectral_norm' is True but the checkpoint was trained with "
                                              "False: resume with --no-spectral-norm"):
        train(tiny_config(output_dir=str(run), **{**TINY_RUN, "max_steps": 3}, spectral_norm=True), accelerator)


def test_a_spectral_norm_checkpoint_verifies_and_resumes(tmp_path, accelerator):
    settings = {**TINY_RUN, "spectral_norm": True}
    assert train(tiny_config(output_dir=str(tmp_path), **settings), accelerator) == 0
    newest = sorted(checkpoints_dir(tmp_path).glob("step_*"))[-1]
    assert verify(newest) is None
    assert train(tiny_config(output_dir=str(tmp_path), **{**settings, "max_steps": 3}), accelerator) == 0


def test_a_checkpoint_further_into_an_epoch_than_the_data_has_images_is_refused_on_resume(run, accelerator):
    """The checkpoint does not know the data set; the run that resumes it does."""
    newer = sorted(checkpoints_dir(run).glob("step_*"))[-1]
    edit_state(newer, position(images_seen=70000))
    reseal(newer)
    assert verify(newer) is None
    with pytest.raises(CheckpointError, match="stands 70000 images into an epoch of a data set of 60000"):
        train(tiny_config(output_dir=str(run), **{**TINY_RUN, "max_steps": 3}), accelerator)
