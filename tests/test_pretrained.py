"""The shipped pretrained networks (pretrained/, the default's; pretrained/mnist-conv/, the mnist_conv preset's): they
load on a fresh clone and make digits of every class."""

from __future__ import annotations

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from vaegan_dist import VAEGAN
from vaegan_dist.cli.sample import main as sample_main
from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.classifier import embed, load_classifier
from vaegan_dist.evaluation.scores import prior_samples
from vaegan_dist.evaluation.statistics import class_histogram
from vaegan_dist.hub.network_files import MODEL_FILE, load_networks
from vaegan_dist.model.networks import eval_mode

PRETRAINED = REPO / "pretrained"
CONV = PRETRAINED / "mnist-conv"  # the mnist_conv preset's


def test_the_weights_are_float16_safetensors_in_the_hub_format_with_config_and_model_card():
    assert (PRETRAINED / "config.json").is_file()
    weights = load_file(PRETRAINED / MODEL_FILE)
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert {key.split(".")[0] for key in weights} == {"encoder", "decoder"}
    card = (PRETRAINED / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["datasets"] == ["mnist"] and meta["license"] and "vae-gan" in meta["tags"]
    assert {m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]} >= {"fid", "precision", "recall"}


def test_the_decoder_makes_confident_digits_of_every_class_in_the_issue_bounds():
    config, _, decoder = load_networks(PRETRAINED)
    with eval_mode(decoder):
        pixels = decoder(prior_samples(2000, config.latent_dim, seed=1))
    _, probs = embed(load_classifier("cpu"), pixels)
    shares = class_histogram(probs)
    assert ((shares >= 0.06) & (shares <= 0.14)).all(), shares
    assert probs.max(dim=1).values.mean() > 0.9  # the classifier is sure of what it sees: digits, not blobs


def test_the_readme_sampling_command_works_on_it(tmp_path, capsys):
    sample_main([str(PRETRAINED), "--mode", "samples", "--count", "64", "--out", str(tmp_path / "grid.npy")])
    images = np.load(tmp_path / "grid.npy")
    assert images.shape == (64, 28, 28) and images.dtype == np.uint8 and images.std() > 30


def test_the_conv_export_loads_and_its_mixture_samples_digits_of_every_class(tmp_path):
    model = VAEGAN.from_pretrained(str(CONV))
    assert (model.config.architecture, model.config.image_shape) == ("conv", (1, 28, 28))
    images, _ = load_mnist(None, "train")
    prior = model.fit_prior(images[:10_000, None].float() / 255)
    samples = model.sample(2000, torch.Generator().manual_seed(1), prior=prior)
    _, probs = embed(load_classifier("cpu"), samples.flatten(1) * 2 - 1)
    shares = class_histogram(probs)
    assert ((shares >= 0.07) & (shares <= 0.13)).all(), shares
    assert probs.max(dim=1).values.mean() > 0.9
    sample_main([str(CONV), "--prior", "mixture", "--count", "16", "--out", str(tmp_path / "grid.npy")])
    assert np.load(tmp_path / "grid.npy").shape == (16, 28, 28)
