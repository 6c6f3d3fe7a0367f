"""The encoder's and decoder's moving averages (--ema-decay): their update, that training never reads them, and who
reads them."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from tests import forked
from tests.conftest import tiny_config, tiny_flags
from vaegan_dist.checkpoint.layout import MARKER, checkpoints_dir
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, verify
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES, weights_digest
from vaegan_dist.checkpoint.writing import save_checkpoint
from vaegan_dist.cli.export import main as export_main
from vaegan_dist.hub.network_files import load_networks
from vaegan_dist.model.networks import Autoencoder, PerNetwork, build_models, moving_averages, update_averages
from vaegan_dist.training.metrics import MetricWindow
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import adam_optimizers


def test_update_is_a_lerp_with_a_warm_up_and_making_the_averages_draws_no_randomness():
    config = tiny_config()
    networks = build_models(config)
    state = torch.get_rng_state()
    averages = moving_averages(config, networks)
    assert torch.equal(torch.get_rng_state(), state)
    for name in Autoencoder._fields:
        average = getattr(averages, name)
        assert type(average) is type(getattr(networks, name))
        assert not any(p.requires_grad for p in average.parameters()) and not average.training
    before = {name: {k: v.clone() for k, v in getattr(averages, name).state_dict().items()}
              for name in Autoencoder._fields}
    with torch.no_grad():
        for p in [*networks.encoder.parameters(), *networks.decoder.parameters()]:
            p.add_(1.0)
    update_averages(averages, networks, decay=0.99, step=10_000)  # past the warm-up: the decay itself
    for name in Autoencoder._fields:
        trained = getattr(networks, name).state_dict()
        for key, value in getattr(averages, name).state_dict().items():
            torch.testing.assert_close(value, 0.99 * before[name][key] + 0.01 * trained[key])
    update_averages(averages, networks, decay=0.99, step=0)  # warm-up: d = 1/10, mostly the new weights
    for name in Autoencoder._fields:
        trained = getattr(networks, name).state_dict()
        for key, value in getattr(averages, name).state_dict().items():
            torch.testing.assert_close(value, 0.1 * (0.99 * before[name][key] + 0.01 * trained[key])
                                       + 0.9 * trained[key])


def run(output_dir, **flags):
    """A run of one CPU process, forked (tests/forked.py)."""
    result = forked.run("vaegan_dist.train", tiny_flags(max_steps=12, output_dir=output_dir, **flags),
                        output_dir.parent / f"{output_dir.name}_logs", env=forked.default_env(ACCELERATE_USE_CPU="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return Checkpoint(newest_complete(checkpoints_dir(output_dir), report=pytest.fail))


def test_training_is_the_same_with_or_without_the_averages_and_readers_choose_them(tmp_path, capsys):
    plain = run(tmp_path / "plain", ema_decay=0.0)
    averaged = run(tmp_path / "averaged", ema_decay=0.9)

    assert not any(plain.has_network(file) for file in AVERAGE_FILES.values())
    for name in PerNetwork._fields:  # the averages are observers: the trained weights are bit for bit the same
        for key, value in plain.network(name).items():
            assert torch.equal(averaged.network(name)[key], value), (name, key)
    ema = {name: averaged.network(file) for name, file in AVERAGE_FILES.items()}
    raw = {name: averaged.network(name) for name in AVERAGE_FILES}
    for name in AVERAGE_FILES:
        assert ema[name].keys() == raw[name].keys()
        assert not all(torch.equal(ema[name][k], raw[name][k]) for k in raw[name])

    def read(directory, weights="ema"):
        _, encoder, decoder = load_networks(directory, weights=weights)
        return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}

    def same(loaded, expected):
        return all(torch.equal(loaded[name][k], v) for name in expected for k, v in expected[name].items())

    plain_raw = {name: plain.network(name) for name in AVERAGE_FILES}
    assert same(read(tmp_path / "averaged"), ema) and same(read(tmp_path / "averaged", "raw"), raw)
    assert same(read(tmp_path / "plain"), plain_raw)  # no averages kept: "ema" reads the trained networks

    for weights, expected in (("ema", ema), ("raw", raw)):
        export_main([str(tmp_path / "averaged"), str(tmp_path / weights), "--dtype", "float32", "--weights", weights])
        assert same(read(tmp_path / weights), expected)
    assert "(the moving averages of the encoder and the decoder)" in capsys.readouterr().out


def test_a_checkpoint_with_the_decoders_average_alone_is_read_and_resumed(tmp_path):
    """Checkpoints of version 0.2 kept the decoder's average only: readers take it with the trained encoder, and a
    resumed run starts the encoder's average from the trained encoder."""
    config = tiny_config(output_dir=str(tmp_path), ema_decay=0.9)
    networks = build_models(config)
    state = TrainState(Position(8, 0, 128), MetricWindow(torch.device("cpu")))
    path = save_checkpoint(Accelerator(cpu=True), tmp_path, config, networks, adam_optimizers(networks, config),
                           state)
    decoder_average = moving_averages(config, networks).decoder
    with torch.no_grad():
        for p in decoder_average.parameters():
            p.add_(1.0)
    save_file(decoder_average.state_dict(), path / "decoder_ema.safetensors")
    reseal(path, {**networks._asdict(), "decoder_ema": decoder_average})

    _, encoder, decoder = load_networks(path)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in networks.encoder.state_dict().items())
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in decoder_average.state_dict().items())
    averages = moving_averages(config, build_models(config))
    Checkpoint(path).load_networks(build_models(config), averages)
    for average, expected in ((averages.encoder, networks.encoder), (averages.decoder, decoder_average)):
        assert all(torch.equal(average.state_dict()[k], v) for k, v in expected.state_dict().items())


def reseal(path, modules):
    """Records the replicas' digest of these modules and the files' hashes, as a save of them would have."""
    state = json.loads((path / "state.json").read_text())
    state["replica_digests"] = [weights_digest(modules)]
    (path / "state.json").write_text(json.dumps(state))
    hashes = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.name != MARKER}
    (path / MARKER).write_text(json.dumps({"sha256": hashes}))
    assert verify(path) is None
