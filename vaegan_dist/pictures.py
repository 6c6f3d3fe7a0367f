"""PNG grids of what the model makes: samples from a fixed z, and test digits beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from vaegan_dist.models import eval_mode, pixels_to_images

PADDING = 2


def grid_image(pixels: Tensor, nrow: int = 8) -> Image.Image:
    """Rows of pixels in [-1, 1] as one greyscale image of 28×28 digits (white on black), nrow per row,
    PADDING black pixels between and around them (the layout of torchvision's make_grid)."""
    digits = F.pad(pixels_to_images(pixels)[:, 0].cpu(), (PADDING, 0, PADDING, 0))  # (N, 30, 30)
    nrow = min(nrow, digits.shape[0])
    rows = -(-digits.shape[0] // nrow)
    digits = torch.cat([digits, digits.new_zeros(rows * nrow - digits.shape[0], *digits.shape[1:])])
    side = digits.shape[-1]
    grid = digits.reshape(rows, nrow, side, side).permute(0, 2, 1, 3).reshape(rows * side, nrow * side)
    grid = F.pad(grid, (0, PADDING, 0, PADDING))
    # + 0.5 then truncation, as torchvision's save_image rounds (round() would send halves to even)
    return Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy(), mode="L")


def save_grid(pixels: Tensor, path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(pixels, nrow).save(path)


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
