"""PNG grids of what the model makes: samples from a fixed z, and test digits beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from vaegan_dist.models import eval_mode, pixels_to_images


def save_grid(pixels: Tensor, path: Path, nrow: int = 8) -> None:
    """Rows of pixels in [-1, 1] as a grid of 28×28 digits (white on black)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(pixels_to_images(pixels), path, nrow=nrow, padding=2)


def reconstruction_pairs(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> Tensor:
    """Each image of x followed by its reconstruction from μ (dropout off): rows x₀, x̃₀, x₁, x̃₁, ..."""
    with eval_mode(encoder, decoder):
        mu, _ = encoder(x)
        x_tilde = decoder(mu).float()
    return torch.stack([x.float(), x_tilde], dim=1).reshape(-1, x.shape[1])


def save_epoch_grids(encoder: nn.Module, decoder: nn.Module, fixed_z: Tensor, test_x: Tensor,
                     output_dir: Path, tag: str) -> None:
    """samples/<tag>.png from fixed_z, and reconstructions/<tag>.png of test_x (pairs side by side)."""
    with eval_mode(decoder):
        samples = decoder(fixed_z)
    save_grid(samples, output_dir / "samples" / f"{tag}.png")
    save_grid(reconstruction_pairs(encoder, decoder, test_x), output_dir / "reconstructions" / f"{tag}.png")
