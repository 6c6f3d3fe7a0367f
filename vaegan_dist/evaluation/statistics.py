"""Sample-quality metrics as pure functions of a classifier's features and class probabilities.

`real` and `fake` are feature matrices (N, D) of real and generated images; `probs` are softmax outputs
(N, C). Sums are accumulated in float64.
  frechet_distance           FID (Heusel et al. 2017) between Gaussians fitted to the two feature sets
  kernel_inception_distance  KID (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel
  precision_recall           k-NN manifold precision and recall (Kynkäänniemi et al. 2019)
  inception_score            exp E_x KL(p(y|x) ‖ p(y)) (Salimans et al. 2016): 1 to the number of classes
  class_histogram            the fraction of samples assigned to each class
  aggregate_posterior        how far an encoder's posterior over a data set is from the prior N(0, I)
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_and_covariance(features: Tensor) -> tuple[Tensor, Tensor]:
    """The mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = features.double()
    return x.mean(dim=0), torch.cov(x.T)


def frechet_distance(real: Tensor, fake: Tensor, eps: float = 1e-6) -> float:
    """‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½), with eps·I added to both covariances.

    ReLU features have dead units, so the covariances are singular without eps.
    """
    mu_r, cov_r = mean_and_covariance(real)
    mu_f, cov_f = mean_and_covariance(fake)
    eye = eps * torch.eye(cov_r.shape[0], dtype=cov_r.dtype, device=cov_r.device)
    cov_r, cov_f = cov_r + eye, cov_f + eye
    # tr (Σ_r Σ_f)^½ = tr (Σ_r^½ Σ_f Σ_r^½)^½, and the latter matrix is symmetric PSD: eigh suffices.
    values, vectors = torch.linalg.eigh(cov_r)
    root_r = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    trace_root = torch.linalg.eigvalsh(root_r @ cov_f @ root_r).clamp(min=0).sqrt().sum()
    return ((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * trace_root).item()


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x·y / D + 1)³ for all pairs of rows of x (..., n, D) and y (..., m, D): shape (..., n, m)."""
    return (x @ y.transpose(-1, -2) / x.shape[-1] + 1).pow(3)


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """The unbiased estimate of MMD² between samples x (..., n, D) and y (..., m, D) under polynomial_kernel,
    one per leading index.

    The kernel is evaluated in the inputs' dtype and summed in float64: MMD² is a small difference of
    large sums, and float32 kernel entries are twice as fast as float64 ones at no visible cost."""

    def off_diagonal_mean(k: Tensor) -> Tensor:
        n = k.shape[-1]
        total = k.sum(dim=(-2, -1), dtype=torch.float64) - k.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
        return total / (n * (n - 1))

    k_xy = polynomial_kernel(x, y)
    cross = k_xy.sum(dim=(-2, -1), dtype=torch.float64) / (k_xy.shape[-2] * k_xy.shape[-1])
    return off_diagonal_mean(polynomial_kernel(x, x)) + off_diagonal_mean(polynomial_kernel(y, y)) - 2 * cross


def kernel_inception_distance(real: Tensor, fake: Tensor, num_subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None, max_kernel_entries: int = 10**7) -> float:
    """KID: the mean of mmd2_unbiased over random subsets of min(subset_size, N_real, N_fake) rows of each.

    Near 0 (it can be slightly negative) when both sets come from one distribution. The subsets are
    drawn with `generator` (a CPU generator), so a seeded generator gives the same value every time. They
    are evaluated in batches of at most max_kernel_entries kernel entries: few large operations, bounded memory.
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    real_rows = torch.rand(num_subsets, real.shape[0], generator=generator).argsort(dim=1)[:, :size]
    fake_rows = torch.rand(num_subsets, fake.shape[0], generator=generator).argsort(dim=1)[:, :size]
    per_batch = max(1, max_kernel_entries // (size * size))
    mmd2 = [mmd2_unbiased(real[r.to(real.device)], fake[f.to(fake.device)])
            for r, f in zip(real_rows.split(per_batch), fake_rows.split(per_batch), strict=True)]
    return torch.cat(mmd2).mean().item()


def knn_radii(features: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Each row's distance to its k-th nearest other row: the radius of its ball in the k-NN manifold."""
    # The k + 1 smallest distances of a row include its distance to itself, 0.
    return torch.cat([torch.cdist(rows, features).topk(k + 1, dim=1, largest=False).values[:, -1]
                      for rows in features.float().split(chunk)])


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, real_radii: Tensor | None = None,
                     chunk: int = 1024) -> tuple[float, float]:
    """(precision, recall): the fraction of fake rows inside some real row's k-NN ball, and of real rows inside
    some fake row's. One pass over the real-to-fake distances, chunk real rows at a time, serves both.

    real_radii, when given, is knn_radii(real, k), computed once for a reference set."""
    real, fake = real.float(), fake.float()
    real_radii = knn_radii(real, k, chunk) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k, chunk)
    fake_on_real = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_on_fake = []
    for rows, radii in zip(real.split(chunk), real_radii.split(chunk), strict=True):
        distances = torch.cdist(rows, fake)
        fake_on_real |= (distances <= radii[:, None]).any(dim=0)
        real_on_fake.append((distances <= fake_radii).any(dim=1))
    return fake_on_real.float().mean().item(), torch.cat(real_on_fake).float().mean().item()


def inception_score(probs: Tensor) -> float:
    """exp of the mean KL divergence between each p(y|x) and the marginal p(y), over all rows at once.

    1 when every sample gets the same distribution; the number of classes when every sample is
    classified with certainty and the classes are equally frequent.
    """
    p = probs.double()
    marginal = p.mean(dim=0, keepdim=True)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal.expand_as(p))).sum(dim=1)
    return kl.mean().exp().item()


def class_histogram(probs: Tensor) -> Tensor:
    """The fraction of rows whose most probable class is each class, shape (C,), summing to 1."""
    counts = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    return counts.double() / probs.shape[0]


def aggregate_posterior(mu: Tensor, logvar: Tensor, eps: Tensor) -> dict[str, float]:
    """The aggregate posterior of an encoder over N images, from μ, log σ² and noise ε (each (N, latent_dim)).

    With z = μ + σ·ε: latent_mean_abs, the mean over dimensions of |mean over images of μ| (0 for the prior);
    latent_std_mean, _min, _max, the mean, smallest and largest over dimensions of the standard deviation of z
    over the images (1 for the prior), and latent_std_worst, that of the dimension farthest from 1;
    latent_sigma, the mean σ.
    """
    mu, logvar, eps = mu.double(), logvar.double(), eps.double()
    sigma = torch.exp(0.5 * logvar)
    z_std = (mu + sigma * eps).std(dim=0)
    return {
        "latent_mean_abs": mu.mean(dim=0).abs().mean().item(),
        "latent_std_mean": z_std.mean().item(),
        "latent_std_min": z_std.min().item(),
        "latent_std_max": z_std.max().item(),
        "latent_std_worst": z_std[(z_std - 1).abs().argmax()].item(),
        "latent_sigma": sigma.mean().item(),
    }
