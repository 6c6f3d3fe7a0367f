"""The Gaussian mixture fitted to the codes (sampling beside N(0, I)): the fit, its samples, and where the commands
and VAEGAN use it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vaegan_dist import VAEGAN
from vaegan_dist.cli import eval as eval_command
from vaegan_dist.cli.sample import main as sample_main
from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.prior import fitted_mixture, prior_codes
from vaegan_dist.evaluation.scores import evaluate, prior_samples
from vaegan_dist.hub.network_files import load_networks
from vaegan_dist.model.mixture import GaussianMixture


def two_clusters(count: int = 4000) -> torch.Tensor:
    """30% of the codes around (-3, 0, 0), 70% around (3, 1, 0), spread 0.5 and 1: the origin, where N(0, I) puts
    most of its mass, is empty."""
    g = torch.Generator().manual_seed(1)
    small = torch.randn(int(0.3 * count), 3, generator=g) * 0.5 + torch.tensor([-3.0, 0, 0])
    large = torch.randn(count - len(small), 3, generator=g) + torch.tensor([3.0, 1, 0])
    return torch.cat([small, large])


def test_the_fit_finds_the_clusters_their_weights_and_spreads():
    mixture = GaussianMixture.fit(two_clusters(), components=2)
    order = mixture.means[:, 0].argsort()
    torch.testing.assert_close(mixture.weights[order], torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(mixture.means[order], torch.tensor([[-3.0, 0, 0], [3, 1, 0]], dtype=torch.float64),
                               atol=0.1, rtol=0)
    spreads = mixture.covariances[order].diagonal(dim1=1, dim2=2).sqrt()
    torch.testing.assert_close(spreads, torch.tensor([[0.5] * 3, [1.0] * 3], dtype=torch.float64), atol=0.06, rtol=0)


def test_its_samples_fall_where_the_codes_are_seeded_by_the_generator():
    mixture = GaussianMixture.fit(two_clusters(), components=10)
    z = mixture.sample(20_000, torch.Generator().manual_seed(0))
    assert z.shape == (20_000, 3) and z.dtype == torch.float32
    assert abs((z[:, 0] < 0).float().mean().item() - 0.3) < 0.02  # the clusters' shares
    assert (z.norm(dim=1) < 1).float().mean() < 0.01  # where N(0, I) draws 20% of its codes
    torch.testing.assert_close(z, mixture.sample(20_000, torch.Generator().manual_seed(0)), atol=0, rtol=0)
    assert not torch.equal(z, mixture.sample(20_000, torch.Generator().manual_seed(1)))


def test_a_correlated_gaussian_is_sampled_with_its_covariance():
    covariance = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, -0.5], [0.0, -0.5, 2.0]])
    g = torch.Generator().manual_seed(2)
    codes = torch.randn(20_000, 3, generator=g) @ torch.linalg.cholesky(covariance).T + 1
    mixture = GaussianMixture.fit(codes, components=1)
    z = mixture.sample(50_000, g)
    torch.testing.assert_close(torch.cov(z.T), covariance, atol=0.05, rtol=0)
    torch.testing.assert_close(z.mean(dim=0), torch.ones(3), atol=0.03, rtol=0)


def test_too_few_or_diverged_codes_are_a_clear_error():
    with pytest.raises(ValueError, match="a mixture of 10 Gaussians needs at least 10 codes, not 4"):
        GaussianMixture.fit(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="not all finite: the encoder has diverged"):
        GaussianMixture.fit(torch.full((20, 3), float("nan")))


def test_the_normal_prior_is_the_samples_of_before_bit_for_bit(exported):
    config, encoder, _ = load_networks(exported)
    assert torch.equal(prior_codes("normal", 50, 3, encoder, config), prior_samples(50, config.latent_dim, 3))
    with pytest.raises(ValueError, match="prior 'uniform': choose normal or mixture"):
        prior_codes("uniform", 50, 3, encoder, config)


def test_the_mixture_is_fitted_to_the_codes_of_training_images(exported):
    config, encoder, _ = load_networks(exported)
    mixture = fitted_mixture(encoder, config)
    assert mixture.means.shape == (10, config.latent_dim) and torch.isclose(mixture.weights.sum(), torch.tensor(1.0,
                                                                                             dtype=torch.float64))
    images, _ = load_mnist(None, "train")
    with torch.no_grad():
        mu = encoder(images[:10_000].flatten(1).float() / 127.5 - 1)[0].double()
    assert mu.mean(dim=0).abs().max() > 0.1  # far from N(0, I)'s mean
    # the mixture's mean is the codes' mean (EM keeps it)
    torch.testing.assert_close(mixture.weights @ mixture.means, mu.mean(dim=0), atol=0.02, rtol=0)
    z = prior_codes("mixture", 200, 5, encoder, config)
    assert torch.equal(z, prior_codes("mixture", 200, 5, encoder, config))  # the same fit, the same draw


def test_vaegan_eval_and_sample_take_the_mixture(exported, tmp_path, capsys):
    out = tmp_path / "eval.json"
    eval_command.main([str(exported), "--samples", "200", "--prior", "mixture", "--out", str(out), "--device", "cpu"])
    normal = tmp_path / "normal.json"
    eval_command.main([str(exported), "--samples", "200", "--out", str(normal), "--device", "cpu"])
    report, before = json.loads(out.read_text()), json.loads(normal.read_text())
    assert (report["prior"], before["prior"]) == ("mixture", "normal")
    assert report["model"]["fid"] != before["model"]["fid"]
    assert report["model"]["recon_mse"] == before["model"]["recon_mse"]  # reconstructions use no prior
    sample_main([str(exported), "--out", str(tmp_path / "m.npy"), "--prior", "mixture", "--count", "6", "--device",
                 "cpu"])
    assert np.load(tmp_path / "m.npy").shape == (6, 28, 28)
    with pytest.raises(SystemExit) as exit_info:
        sample_main([str(exported), "--out", str(tmp_path / "r.png"), "--mode", "reconstruct", "--prior", "mixture"])
    assert exit_info.value.code == 2
    assert "--prior picks the codes of --mode samples" in capsys.readouterr().err


def test_vaegan_samples_from_a_fitted_prior(exported):
    model = VAEGAN.from_pretrained(str(exported))
    images, _ = load_mnist(None, "train")
    prior = model.fit_prior(images[:3000, None].float() / 255)
    assert prior.means.shape == (10, model.latent_dim)
    first = model.sample(5, torch.Generator().manual_seed(2), prior=prior)
    assert first.shape == (5, 1, 28, 28) and first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, model.sample(5, torch.Generator().manual_seed(2), prior=prior))
    other = GaussianMixture.fit(torch.randn(100, model.latent_dim + 1))
    with pytest.raises(ValueError, match="fit it with this model's fit_prior"):
        model.sample(5, prior=other)
    on_a_gpu = SimpleNamespace(device=torch.device("cuda"))  # what sample reads of a CUDA generator
    with pytest.raises(ValueError, match="draws on the CPU: pass a CPU generator"):
        model.sample(5, on_a_gpu, prior=prior)


def test_evaluate_refuses_codes_of_the_wrong_shape(exported):
    config, encoder, decoder = load_networks(exported)
    with pytest.raises(ValueError, match=r"z of shape \(8, 3\): evaluate needs \(8, 4\)"):
        evaluate(encoder, decoder, config, 8, z=torch.zeros(8, 3))
