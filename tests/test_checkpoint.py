"""Checkpoints in one process: the round trip, verification, fallback, pruning, config conflicts, no pickle."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from accelerate import Accelerator

from tests.conftest import tiny_config
from tests.test_step import make_inputs
from vaegan_dist.checkpoint.layout import CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.policy import config_changes
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, resolve_resume, verify
from vaegan_dist.checkpoint.tensors import load_optimizer_tensors
from vaegan_dist.checkpoint.writing import save_checkpoint
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.metrics import MetricWindow
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import adam_optimizers, routed_gradients


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def trained(config, seed=0):
    """Networks and Adam optimizers after one step, so the optimizers have state."""
    torch.manual_seed(seed)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    routed_gradients(*networks, *make_inputs(config, dtype=torch.float32), config)
    for optimizer in optimizers:
        optimizer.step()
    return networks, optimizers


RNG_STATE = torch.Generator().manual_seed(123).get_state()


def save(accelerator, tmp_path, step, config=None, networks=None, optimizers=None):
    config = config or tiny_config(output_dir=str(tmp_path))
    if networks is None:
        networks, optimizers = trained(config)
    torch.set_rng_state(RNG_STATE)
    state = TrainState(Position(step, 1, 2048), MetricWindow(torch.device("cpu")))
    return save_checkpoint(accelerator, tmp_path, config, networks, optimizers, state)


def test_round_trip_restores_weights_and_optimizer_state_exactly(accelerator, tmp_path):
    config = tiny_config()
    networks, optimizers = trained(config)
    path = save(accelerator, tmp_path, 7, config, networks, optimizers)
    assert path == checkpoints_dir(tmp_path) / "step_0000007"
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == "step_0000007\n"
    assert verify(path) is None

    checkpoint = Checkpoint(path)
    assert checkpoint.state["position"] == {"step": 7, "epoch": 1, "images_seen": 2048}
    assert checkpoint.config == config.to_dict()
    fresh, fresh_optimizers = trained(config, seed=1)
    checkpoint.load_networks(fresh, None)
    load_optimizer_tensors(fresh_optimizers, checkpoint.optimizers())
    for network, loaded_network, optimizer, loaded_optimizer in zip(networks, fresh, optimizers, fresh_optimizers,
                                                                     strict=True):
        for a, b in zip(network.parameters(), loaded_network.parameters(), strict=True):
            assert torch.equal(a, b)
        saved, loaded = optimizer.state_dict(), loaded_optimizer.state_dict()
        assert saved["state"].keys() == loaded["state"].keys()
        for index, state in saved["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][index][key])), key
    assert torch.equal(checkpoint.rank_tensors(0)["rng.torch"], RNG_STATE)


def test_loading_keeps_the_new_learning_rate(accelerator, tmp_path):
    path = save(accelerator, tmp_path, 1)
    _, optimizers = trained(tiny_config(lr=1e-3))
    load_optimizer_tensors(optimizers, Checkpoint(path).optimizers())
    assert all(opt.param_groups[0]["lr"] == 1e-3 for opt in optimizers)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "delete"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(accelerator, tmp_path, damage):
    older, newer = save(accelerator, tmp_path, 1), save(accelerator, tmp_path, 2)
    target = newer / "decoder.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no_marker":
        (newer / "COMPLETE").unlink()
    else:
        target.unlink()
    lines = []
    assert resolve_resume("auto", tmp_path, lines.append) == older
    assert len(lines) == 1 and "step_0000002" in lines[0]
    with pytest.raises(CheckpointError, match="not a usable checkpoint"):  # named explicitly: no fallback
        resolve_resume(str(newer), tmp_path, lines.append)


def test_resume_modes(accelerator, tmp_path):
    assert resolve_resume("auto", tmp_path, print) is None  # nothing yet: a fresh start
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path, print)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path, print)
    path = save(accelerator, tmp_path, 3)
    assert resolve_resume("latest", tmp_path, print) == path
    assert resolve_resume("none", tmp_path, print) is None
    assert resolve_resume(str(tmp_path), "elsewhere", print) == path  # an output directory: its newest
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match="not a usable checkpoint: it has no COMPLETE marker"):
        resolve_resume(str(tmp_path / "notes"), tmp_path, print)


def test_interrupted_save_leaves_the_previous_checkpoint_and_is_cleaned_up(accelerator, tmp_path, monkeypatch):
    first = save(accelerator, tmp_path, 1)
    import vaegan_dist.checkpoint.writing as checkpoint_module

    def fail_publish(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "replace", fail_publish)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(accelerator, tmp_path, 2)
    monkeypatch.undo()
    assert newest_complete(checkpoints_dir(tmp_path), print) == first
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == "step_0000001\n"
    assert list(checkpoints_dir(tmp_path).glob(".tmp-*"))  # the partial save, ignored
    save(accelerator, tmp_path, 3)
    assert not list(checkpoints_dir(tmp_path).glob(".tmp-*"))  # and removed by the next save


def test_pruning_keeps_the_last_k_and_every_mth(accelerator, tmp_path):
    config = tiny_config(keep_last=2, keep_every=4)
    networks, optimizers = trained(config)
    for step in range(1, 10):
        save(accelerator, tmp_path, step, config, networks, optimizers)
    kept = sorted(p.name for p in checkpoints_dir(tmp_path).glob("step_*"))
    assert kept == ["step_0000004", "step_0000008", "step_0000009"]


def test_architecture_changes_are_errors_naming_the_key_and_others_are_reported():
    saved = tiny_config().to_dict()
    with pytest.raises(CheckpointError, match="'latent_dim'"):
        list(config_changes(saved, tiny_config(latent_dim=8)))
    changes = list(config_changes(saved, tiny_config(lr=1e-3, epochs=99, output_dir="elsewhere", max_steps=7)))
    assert changes == [("lr", saved["lr"], 1e-3), ("epochs", saved["epochs"], 99)]  # said; output_dir: silent
    paper = tiny_config(architecture="conv", encoder_batch_norm=True).to_dict()
    with pytest.raises(CheckpointError, match=r"'encoder_batch_norm'.*--encoder-batch-norm"):  # other parameters
        list(config_changes(paper, tiny_config(architecture="conv")))


def test_loading_never_unpickles(accelerator, tmp_path, monkeypatch):
    """Files named as Accelerate names its pickles are never opened, and no unpickler runs at all."""
    path = save(accelerator, tmp_path, 5)
    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    for name in ("optimizer.bin", "optimizer_1.bin", "random_states_0.pkl", "scaler.pt", "pytorch_model.bin"):
        (path / name).write_bytes(pickle.dumps(Payload()))

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    checkpoint = Checkpoint(resolve_resume("auto", tmp_path, print))
    for name in PerNetwork._fields:
        checkpoint.network(name)
    checkpoint.optimizers()
    checkpoint.rank_tensors(0)
    json.dumps(checkpoint.state)
    assert not witness.exists()


def test_a_checkpoint_copied_elsewhere_still_verifies(accelerator, tmp_path):
    path = save(accelerator, tmp_path / "a", 1)
    copy = shutil.copytree(path, tmp_path / "b" / path.name)
    assert verify(copy) is None


def test_export_from_a_run_directory_takes_its_newest_checkpoint(accelerator, tmp_path, capsys):
    from vaegan_dist.cli.export import main
    from vaegan_dist.hub.network_files import load_networks

    save(accelerator, tmp_path / "run", 1)
    newest = save(accelerator, tmp_path / "run", 2, tiny_config(), *trained(tiny_config(), seed=5))
    main([str(tmp_path / "run"), str(tmp_path / "export"), "--dtype", "float32"])
    assert f"exported the encoder and decoder of {newest}" in capsys.readouterr().out
    _, _, decoder = load_networks(tmp_path / "export")
    _, _, from_run = load_networks(tmp_path / "run")
    expected = Checkpoint(newest).network("decoder")
    for network in (decoder, from_run):
        assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), str(tmp_path / "export2")])
    assert exit_info.value.code == 2 and "holds no config.json" in capsys.readouterr().err


def test_a_metrics_window_saved_with_other_loss_terms_starts_empty():
    """A checkpoint of an older version, whose LossTerms had fewer fields, still resumes: only its open window of
    averages is dropped."""
    window = MetricWindow(torch.device("cpu"))
    old = {"window.terms": torch.ones(3), "window.norms": torch.ones(3), "window.steps": torch.tensor([5])}
    window.load_tensors(old)
    assert window.steps == 0 and not window.terms.any() and not window.norms.any()
    window.load_tensors({"window.terms": torch.ones_like(window.terms), "window.norms": torch.ones(3),
                         "window.steps": torch.tensor([5])})
    assert window.steps == 5 and window.terms.all()
