"""Settings: the presets, the design's networks, and the command line and config files that fill them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from vaegan_dist.cli.train import parse_args
from vaegan_dist.config import FIELD_NAMES, ConfigError, TrainConfig
from vaegan_dist.model.networks import build_models
from vaegan_dist.presets import PRESETS


def test_seed_preset_is_the_design():
    config = TrainConfig.preset("seed")
    assert (config.gamma, config.beta, config.similarity, config.generator_loss) == (25, 5, "logit", "minimax")
    assert (config.latent_dim, config.hidden_dim, config.depth) == (20, 1024, 3)
    assert all(config.network_dropout(n) == 0.1 for n in ("encoder", "decoder", "discriminator"))
    assert (config.lr, config.adam_beta1, config.adam_beta2) == (1e-4, 0.9, 0.999)
    assert (config.batch_size, config.epochs) == (128, 50)
    # The design's encoder loss: kld (divided by B·784) + β·rec; no pixel term; rec not normalised; no prior match.
    assert (config.kl_weight, config.pixel_weight, config.normalise_similarity, config.prior_match_weight) == (
        1.0, 0.0, False, 0.0)


def test_paper_preset_differs_from_the_design_only_in_similarity():
    seed, paper = TrainConfig.preset("seed").to_dict(), TrainConfig.preset("paper").to_dict()
    assert {k for k in seed if seed[k] != paper[k]} == {"similarity"}
    assert paper["similarity"] == "hidden"


def test_samples_first_is_the_starting_point_with_lr_3e_4_batch_64_sampled_from_the_moving_averages():
    config = TrainConfig.preset("samples_first")
    assert (config.similarity, config.generator_loss, config.gamma, config.lr, config.adam_beta1) == (
        "hidden", "non_saturating", 1.0, 3e-4, 0.5)
    assert config.network_dropout("encoder") == config.network_dropout("decoder") == 0.0
    assert (config.ema_decay, config.batch_size) == (0.999, 64)
    assert dataclasses.replace(config, lr=2e-4, ema_decay=0.0, batch_size=128) == TrainConfig.preset("starting_point")
    assert TrainConfig.preset("seed").ema_decay == TrainConfig.preset("paper").ema_decay == 0.0


def test_default_is_samples_first_with_the_autoencoder_terms_and_the_other_presets_keep_the_designs():
    default, samples_first = TrainConfig().to_dict(), TrainConfig.preset("samples_first").to_dict()
    assert TrainConfig() == TrainConfig.preset("default") == parse_args([])
    assert {k: default[k] for k in default if default[k] != samples_first[k]} == {
        "kl_weight": 10.0, "pixel_weight": 10.0, "normalise_similarity": True, "prior_match_weight": 10.0}
    for name in ("seed", "paper", "starting_point", "samples_first"):
        config = TrainConfig.preset(name)
        assert (config.kl_weight, config.pixel_weight, config.normalise_similarity, config.prior_match_weight) == (
            1.0, 0.0, False, 0.0)


def test_seed_networks_have_the_design_layer_shapes():
    encoder, decoder, discriminator = build_models(TrainConfig.preset("seed"))
    linear_shapes = lambda net: [tuple(m.weight.shape) for m in net.modules()  # noqa: E731
                                 if isinstance(m, torch.nn.Linear)]
    assert linear_shapes(encoder) == [(1024, 784), (1024, 1024), (1024, 1024), (20, 1024), (20, 1024)]
    assert linear_shapes(decoder) == [(1024, 20), (1024, 1024), (1024, 1024), (784, 1024)]
    assert linear_shapes(discriminator) == [(1024, 784), (512, 1024), (256, 512), (1, 256)]
    dropouts = [m.p for net in (encoder, decoder, discriminator) for m in net.modules()
                if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.1] * 12  # one before every linear layer (the encoder's two heads share one)
    x = torch.rand(5, 784) * 2 - 1
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (5, 20)
    images = decoder(mu)
    assert images.shape == (5, 784) and images.abs().max() <= 1
    assert discriminator(images).shape == (5, 1)
    assert discriminator.similarity(images).shape == (5, 1)
    hidden = build_models(TrainConfig.preset("paper"))[2]
    assert hidden.similarity(images).shape == (5, 256)


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("preset: seed\ngamma: 10\nlatent_dim: 8\n")
    config = parse_args(["--config", str(config_file), "--latent-dim", "16", "--max-steps", "3"])
    assert (config.gamma, config.latent_dim, config.max_steps, config.similarity) == (10.0, 16, 3, "logit")
    assert parse_args(["--config", str(config_file), "--preset", "starting_point"]).similarity == "hidden"


def test_json_config_and_none_for_optional_settings(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"encoder_dropout": None, "max_steps": 5}))
    config = parse_args(["--config", str(config_file), "--max-steps", "none"])
    assert config.encoder_dropout is None and config.max_steps is None


@pytest.mark.parametrize(("contents", "message"), [
    ("gama: 3\n", "unknown setting 'gama'"),
    ("gamma: fast\n", "setting 'gamma' must be float"),
    ("latent_dim: 2.5\n", "setting 'latent_dim' must be int"),
    ("similarity: cosine\n", "setting 'similarity' is 'cosine': choose one of logit, hidden"),
    ("epochs: 0\n", "setting 'epochs' must be positive"),
    ("lr: -1e-4\n", "setting 'lr' must be positive"),
    ("lr: 1e4\n", "setting 'lr' times discriminator_lr_scale must be at most 1"),
    ("architecture: conv\nbatch_size: 1\n", "must be at least 2 with --architecture conv"),
    ("lr: 0.5\ndiscriminator_lr_scale: 4\n", "setting 'lr' times discriminator_lr_scale must be at most 1"),
    ("kl_weight: -1\n", "setting 'kl_weight' must be 0 or more"),
    ("lr: 1e-4x\n", "setting 'lr' must be float"),
    ("dropout: 1.5\n", r"setting 'dropout' must be in \[0, 1\)"),
    ("preset: fancy\n", "unknown preset 'fancy'"),
    ("gamma: [1, 2\n", "does not parse"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_files_name_the_key(tmp_path, contents, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(contents)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(config_file)])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_args(["--config", str(tmp_path / "absent.yaml")])


def test_global_batch_must_split_over_processes():
    config = TrainConfig(global_batch_size=256)
    assert config.per_process_batch(2) == 128 and config.per_process_batch(4) == 64
    with pytest.raises(ConfigError, match="global_batch_size 256 does not split evenly over 3"):
        config.per_process_batch(3)
    assert TrainConfig(batch_size=64).per_process_batch(3) == 64


def test_presets_only_name_real_settings():
    for name, values in PRESETS.items():
        assert set(values) <= FIELD_NAMES, name
        TrainConfig.preset(name, **({"data_dir": "images"} if values.get("dataset") == "folder" else {}))


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                            check=True, cwd=REPO)
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in result.stdout
    assert "(default: 0.0003)" in result.stdout and "--preset" in result.stdout


def test_bad_flag_value_exits_with_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--epochs", "-3", "--output-dir",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: setting 'epochs' must be positive"


def test_help_says_what_every_setting_means(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping inside the texts
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f"{f.metadata['help']} (default: " in shown, f.name


def test_the_flag_names_of_diffusers_training_scripts_are_accepted(tmp_path):
    config = parse_args(["--learning_rate", "1e-3", "--checkpointing_steps=500", "--report_to", "tensorboard",
                         "--resume_from_checkpoint", "latest", "--output-dir", str(tmp_path)])
    assert (config.lr, config.save_every, config.tracker, config.resume) == (1e-3, 500, "tensorboard", "latest")
