"""PNG grids of what the model makes: samples from a fixed z, and test digits beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid

from vaegan_dist.models import eval_mode, pixels_to_images


def grid_image(pixels: Tensor, nrow: int = 8) -> np.ndarray:
    """Rows of pixels in [-1, 1] as one uint8 (H, W, 3) image of 28×28 digits (white on black)."""
    grid = make_grid(pixels_to_images(pixels).cpu(), nrow=nrow, padding=2)
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(pixels: Tensor, path: Path, nrow: int = 8) -> None:
    """Rows of pixels in [-1, 1] as a PNG grid of 28×28 digits (white on black)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(pixels, nrow)).save(path)


def reconstruction_pairs(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> Tensor:
    """Each image of x followed by its reconstruction from μ (dropout off): rows x₀, x̃₀, x₁, x̃₁, ..."""
    with eval_mode(encoder, decoder):
        mu, _ = encoder(x)
        x_tilde = decoder(mu).float()
    return torch.stack([x.float(), x_tilde], dim=1).reshape(-1, x.shape[1])


def grid_pixels(encoder: nn.Module, decoder: nn.Module, fixed_z: Tensor, test_x: Tensor) -> dict[str, Tensor]:
    """The two grids' pixels: 'samples' decoded from fixed_z, 'reconstructions' as pairs of test_x."""
    with eval_mode(decoder):
        samples = decoder(fixed_z)
    return {"samples": samples, "reconstructions": reconstruction_pairs(encoder, decoder, test_x)}


def save_epoch_grids(encoder: nn.Module, decoder: nn.Module, fixed_z: Tensor, test_x: Tensor,
                     output_dir: Path, tag: str) -> None:
    """samples/<tag>.png from fixed_z, and reconstructions/<tag>.png of test_x (pairs side by side)."""
    for name, pixels in grid_pixels(encoder, decoder, fixed_z, test_x).items():
        save_grid(pixels, output_dir / name / f"{tag}.png")
