"""FID for any images, with the standard Inception features: torchmetrics' FrechetInceptionDistance on
torch-fidelity's Inception weights (the ones FID papers use), downloaded on first use into torch's cache. It is an
optional extra (`pip install 'vaegan-dist[fid]'`): without it, or without the weights, the evaluation says so in one
line and goes on without FID. On MNIST the package's own classifier-FID (vaegan_dist.evaluation.scores) stays.

The real side, the held-out images, is embedded once per run; each evaluation embeds fresh samples from the prior.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vaegan_dist.model.networks import eval_mode

BATCH = 250


class FIDUnavailable(RuntimeError):
    """FID cannot be computed here. The message says why and what to do, in one line."""


def inception_fid(features: nn.Module | None = None) -> Any:
    """A FrechetInceptionDistance over images (N, 3, H, W) in [0, 1] that keeps its real side between
    evaluations and computes on the calling process alone; `features` replaces Inception (the tests' stand-in)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise FIDUnavailable("FID needs torchmetrics and torch-fidelity: pip install 'vaegan-dist[fid]'") from None
    try:
        return FrechetInceptionDistance(feature=features if features is not None else 2048, normalize=True,
                                        reset_real_features=False, sync_on_compute=False)
    except Exception as err:  # torch-fidelity missing, or the weights' download failing (offline, a proxy)
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise FIDUnavailable(f"FID is off: Inception could not be loaded ({reason}); it is downloaded on first use, "
                             "so run once with the network (or pip install 'vaegan-dist[fid]')") from None


def three_channels(images: Tensor) -> Tensor:
    """Images (N, C, H, W) in [0, 1] with 3 channels (grey repeated)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def as_rgb(rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Pixel rows (N, C·H·W) in [-1, 1] as images (N, 3, H, W) in [0, 1]."""
    return three_channels(((rows.float() + 1) / 2).clamp(0, 1).reshape(len(rows), *shape))


class SampleFID:
    """The FID of a decoder's samples against a fixed set of real images (their features embedded once)."""

    def __init__(self, real_images: Tensor, fid: Any, device: torch.device | str) -> None:
        """real_images: uint8 (N, C, H, W), on any device; embedded on `device` a batch at a time."""
        self.shape, self.fid = tuple(real_images.shape[1:]), fid.to(device)
        for part in real_images.split(BATCH):
            self.fid.update(three_channels(part.to(device).float() / 255), real=True)

    @torch.no_grad()
    def __call__(self, decoder: nn.Module, z: Tensor) -> float:
        """FID of Dec(z) for z (N, latent_dim), N ≥ 2."""
        self.fid.reset()  # the fake side only: reset_real_features is off
        with eval_mode(decoder):
            for part in z.split(BATCH):
                self.fid.update(as_rgb(decoder(part), self.shape), real=False)
        return float(self.fid.compute())
