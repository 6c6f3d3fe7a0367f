"""A Gaussian mixture fitted to the encoder's codes, to sample from instead of N(0, I) (ex-post density estimation,
Ghosh et al. 2020, "From variational to deterministic autoencoders").

The decoder learns on the aggregate posterior q(z) = E_x q(z | x). Where q(z) leaves parts of N(0, I) empty, the
prior's samples there decode to shapes between the data's: with the convolutional networks on MNIST, samples from
N(0, I) score classifier-FID ~22 while μ(x) of training images decode at ~3.3 (docs/results.md). A mixture of
Gaussians fitted to μ(x) of training images follows q(z), and its samples decode as the training images do.

    p(z) = Σ_k w_k N(z; m_k, C_k), fitted by expectation-maximisation in float64:
    E: r_nk = w_k N(z_n; m_k, C_k) / Σ_j w_j N(z_n; m_j, C_j)
    M: w_k = Σ_n r_nk / N,  m_k = Σ_n r_nk z_n / Σ_n r_nk,  C_k = Σ_n r_nk (z_n − m_k)(z_n − m_k)ᵀ / Σ_n r_nk + εI
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COMPONENTS, STEPS = 10, 100  # Ghosh et al.'s 10 components; EM settles well within 100 steps on MNIST's codes
RIDGE = 1e-4  # εI keeps each covariance invertible when a component holds few codes


@dataclass(frozen=True)
class GaussianMixture:
    weights: Tensor  # (K,)
    means: Tensor  # (K, D)
    covariances: Tensor  # (K, D, D)

    @classmethod
    def fit(cls, codes: Tensor, components: int = COMPONENTS, steps: int = STEPS, seed: int = 0) -> GaussianMixture:
        """EM from `components` codes chosen at random (seeded) as the means, identity covariances, equal weights."""
        if len(codes) < components:
            raise ValueError(f"a mixture of {components} Gaussians needs at least {components} codes, "
                             f"not {len(codes)}")
        if not torch.isfinite(codes).all():
            raise ValueError("the codes to fit a mixture to are not all finite: the encoder has diverged")
        z = codes.detach().to("cpu", torch.float64)
        start = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:components]
        eye = torch.eye(z.shape[1], dtype=z.dtype)
        mixture = cls(torch.full((components,), 1 / components, dtype=z.dtype), z[start].clone(),
                      eye.repeat(components, 1, 1))
        for _ in range(steps):
            r = mixture.log_joint(z).softmax(dim=1)  # (N, K)
            mass = r.sum(dim=0) + 1e-12
            means = r.T @ z / mass[:, None]
            centred = z[None] - means[:, None]  # (K, N, D)
            covariances = (r.T[..., None] * centred).transpose(1, 2) @ centred / mass[:, None, None]
            covariances = (covariances + covariances.mT) / 2 + RIDGE * eye  # symmetric to the last bit
            mixture = cls(mass / len(z), means, covariances)
        return mixture

    def log_joint(self, z: Tensor) -> Tensor:
        """log w_k + log N(z_n; m_k, C_k): (N, K)."""
        gaussians = torch.distributions.MultivariateNormal(self.means, scale_tril=torch.linalg.cholesky(
            self.covariances), validate_args=False)  # EM's covariances are valid by construction
        return gaussians.log_prob(z[:, None, :]) + self.weights.log()

    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """count codes (count, D), float32 on the CPU (generator: a CPU one): a component by its weight, then
        m_k + L_k·ε with C_k = L_k L_kᵀ, drawn component by component."""
        component = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        codes = torch.empty_like(noise)
        for k, scale in enumerate(torch.linalg.cholesky(self.covariances)):
            chosen = component == k
            codes[chosen] = self.means[k] + noise[chosen] @ scale.mT
        return codes.float()
