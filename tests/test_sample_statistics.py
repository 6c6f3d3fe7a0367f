"""The sample-quality metrics against closed forms, brute force and hand-built cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from vaegan_dist.evaluation.statistics import (
    aggregate_posterior,
    class_histogram,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    mmd2_unbiased,
    precision_recall,
)


def orthogonal_design(scales: list[float], mean: list[float]) -> torch.Tensor:
    """Rows whose sample mean is `mean` and whose sample covariance is exactly diag(scales² · N / (N − 1)).

    The columns of a 2^D factorial design (all ±1 vectors) are zero-mean and mutually orthogonal.
    """
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(scales))), dtype=torch.float64)
    return signs * torch.tensor(scales, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # For diagonal covariances A and B, FID = ‖μ_a − μ_b‖² + Σ (√a_i − √b_i)².
    a = orthogonal_design([1.0, 2.0, 0.5], [0.0, 1.0, -1.0])
    b = orthogonal_design([3.0, 0.2, 0.5], [1.0, 1.0, 2.0])
    eps = 1e-6
    n = a.shape[0]
    var_a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64) * n / (n - 1) + eps
    var_b = torch.tensor([9.0, 0.04, 0.25], dtype=torch.float64) * n / (n - 1) + eps
    expected = (1.0 + 0.0 + 9.0) + (var_a.sqrt() - var_b.sqrt()).square().sum().item()
    assert frechet_distance(a, b, eps=eps) == pytest.approx(expected, rel=1e-9)
    # A common rotation makes both covariances full matrices and leaves the distance unchanged.
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert frechet_distance(a @ rotation, b @ rotation, eps=eps) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b @ rotation, a @ rotation, eps=eps) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_to_itself_is_zero_even_with_dead_units():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)).relu()
    features[:, :5] = 0  # dead ReLU units: a singular covariance
    assert abs(frechet_distance(features, features)) < 1e-6
    assert frechet_distance(features, features + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)


def brute_force_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a.tolist(), b.tolist(), strict=True)) / len(a) + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen).double() + 0.3
    assert mmd2_unbiased(x, y).item() == pytest.approx(brute_force_mmd2(x, y), rel=1e-9)
    # One subset holding every row is the whole-set estimate, whatever the order of the rows.
    kid = kernel_inception_distance(x[:7], y, num_subsets=1, subset_size=100, generator=gen)
    assert kid == pytest.approx(brute_force_mmd2(x[:7], y), rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_reproducible():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(600, 8, generator=gen), torch.randn(600, 8, generator=gen)
    same = kernel_inception_distance(a, b, num_subsets=20, subset_size=200, generator=torch.Generator().manual_seed(0))
    shifted = kernel_inception_distance(a, b + 1, num_subsets=20, subset_size=200,
                                        generator=torch.Generator().manual_seed(0))
    assert abs(same) < 0.05 < 1.0 < shifted
    again = kernel_inception_distance(a, b, num_subsets=20, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert again == same


def test_knn_radii_are_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    # Sorted distances from 3.0 to the others: 2, 3, 4, 12; the third is 4.
    assert knn_radii(points, k=3, chunk=2).tolist() == [7.0, 6.0, 4.0, 7.0, 14.0]


def test_precision_and_recall_on_hand_built_sets():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=gen)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Every fake sits on one real point: all are realistic (precision 1), but they cover almost nothing.
    collapsed = real[:1] + 1e-4 * torch.randn(200, 2, generator=gen)
    precision, recall = precision_recall(real, collapsed, chunk=64)
    assert precision == 1.0 and recall <= 0.02


def test_inception_score_bounds():
    confident_balanced = torch.eye(10).repeat(30, 1)
    assert inception_score(confident_balanced) == pytest.approx(10.0)
    assert inception_score(torch.eye(10)[[3] * 50]) == pytest.approx(1.0)
    assert inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0)
    two_classes = torch.eye(10)[[0, 1] * 25]
    assert inception_score(two_classes) == pytest.approx(2.0)
    uncertain = torch.softmax(torch.randn(40, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    assert 1.0 < inception_score(uncertain) < 10.0


def test_class_histogram_counts_the_most_probable_class():
    probs = torch.eye(10)[[2, 2, 7, 2]] * 0.9 + 0.01
    histogram = class_histogram(probs)
    assert histogram.shape == (10,) and histogram.sum().item() == pytest.approx(1.0)
    assert histogram[2].item() == 0.75 and histogram[7].item() == 0.25


def test_aggregate_posterior_of_the_prior_and_of_shifted_scaled_and_collapsed_codes():
    g = torch.Generator().manual_seed(0)
    n, d = 20_000, 4
    mu, eps = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    # μ ~ N(0, 0.6²) with σ = 0.8: z = μ + σ·ε has variance 0.36 + 0.64 = 1, as a posterior matching the prior.
    matched = aggregate_posterior(0.6 * mu, torch.full((n, d), 2 * torch.tensor(0.8).log().item()), eps)
    assert matched["latent_mean_abs"] < 0.02 and matched["latent_sigma"] == pytest.approx(0.8)
    assert all(abs(matched[f"latent_std_{k}"] - 1) < 0.02 for k in ("mean", "min", "max", "worst"))
    # A shifted code in one dimension, a doubled one in another, σ → 0 (deterministic encoder).
    logvar = torch.full((n, d), -20.0)
    broken = aggregate_posterior(mu * torch.tensor([1.0, 2.0, 1.0, 0.25]) + torch.tensor([0.0, 0.0, 2.0, 0.0]),
                                 logvar, eps)
    assert broken["latent_mean_abs"] == pytest.approx(0.5, abs=0.02)
    assert broken["latent_std_max"] == pytest.approx(2.0, rel=0.02)
    assert broken["latent_std_min"] == pytest.approx(0.25, rel=0.02)
    assert broken["latent_std_worst"] == broken["latent_std_max"]  # |2 − 1| > |0.25 − 1|
    assert broken["latent_std_mean"] == pytest.approx((1 + 2 + 1 + 0.25) / 4, rel=0.02)
    assert broken["latent_sigma"] < 1e-4
