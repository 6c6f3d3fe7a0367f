"""The decoder's moving average (--ema-decay): its update, that training never reads it, and who reads it."""

from __future__ import annotations

import pytest
import torch

from tests import forked
from tests.conftest import tiny_config, tiny_flags
from vaegan_dist.checkpoint import EMA_FILE, Checkpoint, checkpoints_dir, newest_complete
from vaegan_dist.export import load_networks
from vaegan_dist.export import main as export_main
from vaegan_dist.models import Networks, averaged_decoder, build_models, update_average


def test_update_is_a_lerp_with_a_warm_up_and_making_the_average_draws_no_randomness():
    config = tiny_config()
    _, decoder, _ = build_models(config)
    state = torch.get_rng_state()
    average = averaged_decoder(config, decoder)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(p.requires_grad for p in average.parameters()) and not average.training
    before = {k: v.clone() for k, v in average.state_dict().items()}
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(1.0)
    update_average(average, decoder, decay=0.99, step=10_000)  # past the warm-up: the decay itself
    for key, value in average.state_dict().items():
        torch.testing.assert_close(value, 0.99 * before[key] + 0.01 * decoder.state_dict()[key])
    update_average(average, decoder, decay=0.99, step=0)  # warm-up: d = 1/10, mostly the new weights
    for key, value in average.state_dict().items():
        torch.testing.assert_close(value, 0.1 * (0.99 * before[key] + 0.01 * decoder.state_dict()[key])
                                   + 0.9 * decoder.state_dict()[key])


def run(output_dir, **flags):
    """A run of one CPU process, forked (tests/forked.py)."""
    result = forked.run("vaegan_dist.train", tiny_flags(max_steps=12, output_dir=output_dir, **flags),
                        output_dir.parent / f"{output_dir.name}_logs", env=forked.default_env(ACCELERATE_USE_CPU="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return Checkpoint(newest_complete(checkpoints_dir(output_dir), report=pytest.fail))


def test_training_is_the_same_with_or_without_the_average_and_readers_choose_it(tmp_path, capsys):
    plain = run(tmp_path / "plain", ema_decay=0.0)
    averaged = run(tmp_path / "averaged", ema_decay=0.9)

    assert not plain.has_network(EMA_FILE)
    for name in Networks._fields:  # the average is an observer: the trained weights are bit for bit the same
        for key, value in plain.network(name).items():
            assert torch.equal(averaged.network(name)[key], value), (name, key)
    ema = averaged.network(EMA_FILE)
    raw = averaged.network("decoder")
    assert ema.keys() == raw.keys() and not all(torch.equal(ema[k], raw[k]) for k in raw)

    _, _, ema_decoder = load_networks(tmp_path / "averaged")
    _, _, raw_decoder = load_networks(tmp_path / "averaged", weights="raw")
    _, _, plain_decoder = load_networks(tmp_path / "plain")  # no average kept: "ema" reads the trained decoder
    for decoder, expected in ((ema_decoder, ema), (raw_decoder, raw), (plain_decoder, plain.network("decoder"))):
        assert all(torch.equal(decoder.state_dict()[k], v) for k, v in expected.items())

    for weights, expected in (("ema", ema), ("raw", raw)):
        export_main([str(tmp_path / "averaged"), str(tmp_path / weights), "--dtype", "float32", "--weights", weights])
        _, _, exported = load_networks(tmp_path / weights)
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in expected.items())
    assert "the decoder's moving average" in capsys.readouterr().out
