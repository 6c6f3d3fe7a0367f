"""Arithmetic on the codes μ(x): walks between two images, and visual attribute vectors (Larsen et al. 2016,
Figure 5): the mean code of images with an attribute minus the mean code of those without, added to an image's
code to give it the attribute."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaegan_dist.model.networks import eval_mode

BATCH = 1000


def codes(encoder: nn.Module, pixels: Tensor) -> Tensor:
    """μ(x) of rows of pixels (N, C·H·W): (N, latent_dim), encoded in batches, dropout off."""
    with eval_mode(encoder):
        return torch.cat([encoder(part)[0].float() for part in pixels.split(BATCH)])


def mean_code(encoder: nn.Module, pixels: Tensor) -> Tensor:
    """The mean of μ(x) over rows of pixels (N, C·H·W)."""
    return codes(encoder, pixels).mean(dim=0)


def attribute_vector(encoder: nn.Module, with_attribute: Tensor, without_attribute: Tensor) -> Tensor:
    """mean μ(x) of the images with the attribute − mean μ(x) of those without: (latent_dim,)."""
    return mean_code(encoder, with_attribute) - mean_code(encoder, without_attribute)


def add_attribute(encoder: nn.Module, decoder: nn.Module, x: Tensor, vector: Tensor) -> Tensor:
    """(N, 3, C·H·W): each image x_i, its reconstruction Dec(μ(x_i)), and Dec(μ(x_i) + vector)."""
    with eval_mode(encoder, decoder):
        mu = encoder(x)[0]
        decoded = decoder(torch.cat([mu, mu + vector.to(mu)])).float()
    return torch.stack([x.float(), *decoded.split(len(x))], dim=1)


def latent_walks(encoder: nn.Module, decoder: nn.Module, a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(N, steps, C·H·W): Dec of `steps` evenly spaced points on the line from μ(a_i) to μ(b_i), ends included."""
    with eval_mode(encoder, decoder):
        mu_a, mu_b = encoder(a)[0], encoder(b)[0]
        t = torch.linspace(0, 1, steps, device=a.device)[None, :, None]
        z = mu_a[:, None] * (1 - t) + mu_b[:, None] * t
        return decoder(z.reshape(-1, z.shape[-1])).float().reshape(len(a), steps, a.shape[1])
