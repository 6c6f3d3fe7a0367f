"""PNG grids of what the model makes: samples from a fixed z, and test digits beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from vaegan_dist.model.networks import eval_mode

PADDING = 2


def to_uint8(pixels: Tensor) -> Tensor:
    """Pixel rows (..., 784) in [-1, 1] as uint8 images (..., 28, 28) on the CPU, 0 black and 255 white, rounded
    as torchvision's save_image rounds: + 0.5, then truncation (round() would send halves to even)."""
    images = pixels.detach().float().add(1.0).div(2.0).clamp(0.0, 1.0).mul(255).add(0.5).to(torch.uint8).cpu()
    return images.reshape(*pixels.shape[:-1], 28, 28)


def grid_image(pixels: Tensor, nrow: int = 8) -> Image.Image:
    """Rows of pixels in [-1, 1] as one greyscale image of 28×28 digits (white on black), nrow per row,
    PADDING black pixels between and around them: torchvision's make_grid layout, drawn here because importing
    torchvision costs each command 1.4 s."""
    digits = to_uint8(pixels)
    nrow = min(nrow, digits.shape[0])
    rows, side = -(-digits.shape[0] // nrow), 28 + PADDING
    grid = torch.zeros(rows * side + PADDING, nrow * side + PADDING, dtype=torch.uint8)
    for i, digit in enumerate(digits):
        top, left = (i // nrow) * side + PADDING, (i % nrow) * side + PADDING
        grid[top:top + 28, left:left + 28] = digit
    return Image.fromarray(grid.numpy(), mode="L")


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
