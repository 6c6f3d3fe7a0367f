"""Where the samples' codes come from: N(0, I), the prior the networks trained with (the paper's, and the default),
or a Gaussian mixture fitted to the codes μ(x) of training images (vaegan_dist.model.mixture), which follows the
aggregate posterior where it leaves parts of N(0, I) empty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaegan_dist.config import TrainConfig
from vaegan_dist.data.images import load_images
from vaegan_dist.data.mnist import DataError
from vaegan_dist.evaluation.scores import prior_samples
from vaegan_dist.model.latent import codes
from vaegan_dist.model.mixture import GaussianMixture
from vaegan_dist.model.networks import images_to_pixels

FIT_IMAGES = 10_000  # ample for 10 components; the fit takes seconds on a CPU (half a minute for 128 dimensions)
FIT_SEED = 0  # which training images, and the mixture's start: the same mixture for every sample seed


def fitted_mixture(encoder: nn.Module, config: TrainConfig, data_dir: str | None = None) -> GaussianMixture:
    """The mixture fitted to μ(x) of up to FIT_IMAGES training images (a fixed random choice of them)."""
    (images,) = load_images(config, "train", data_dir=data_dir)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(FIT_SEED))[:FIT_IMAGES]
    pixels = images_to_pixels(images[chosen]).to(next(encoder.parameters()).device)
    try:
        return GaussianMixture.fit(codes(encoder, pixels), seed=FIT_SEED)
    except ValueError as err:  # too few training images, or a diverged encoder: the commands' one line
        raise DataError(f"--prior mixture: {err}") from None


def prior_codes(prior: str, count: int, seed: int, encoder: nn.Module, config: TrainConfig,
                data_dir: str | None = None) -> Tensor:
    """count codes (count, latent_dim) on the CPU, drawn with seed: from N(0, I) for 'normal' (prior_samples), from
    fitted_mixture for 'mixture'."""
    if prior == "normal":
        return prior_samples(count, config.latent_dim, seed)
    if prior != "mixture":
        raise ValueError(f"prior {prior!r}: choose normal or mixture")
    return fitted_mixture(encoder, config, data_dir).sample(count, torch.Generator().manual_seed(seed))
