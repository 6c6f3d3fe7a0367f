"""PNG grids of what the model makes: samples from a fixed z, and test images beside their reconstructions.
Images are rows of C·H·W pixels in [-1, 1]; `shape` is (C, H, W), C 1 (grey) or 3 (colour)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from vaegan_dist.model.networks import eval_mode

PADDING = 2


def to_uint8(pixels: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Pixel rows (..., C·H·W) in [-1, 1] as uint8 images (..., H, W) (grey) or (..., H, W, 3) (colour) on the
    CPU, 0 black and 255 white, rounded as torchvision's save_image rounds: + 0.5, then truncation (round() would
    send halves to even)."""
    images = pixels.detach().float().add(1.0).div(2.0).clamp(0.0, 1.0).mul(255).add(0.5).to(torch.uint8).cpu()
    images = images.reshape(*pixels.shape[:-1], *shape).movedim(-3, -1)
    return images.squeeze(-1) if shape[0] == 1 else images


def grid_image(pixels: Tensor, shape: tuple[int, int, int], nrow: int = 8) -> Image.Image:
    """Rows of pixels in [-1, 1] as one picture of the images, nrow per row, PADDING black pixels between and
    around them: torchvision's make_grid layout, drawn here because importing torchvision costs each command 1.4 s."""
    images = to_uint8(pixels, shape)
    channels, height, width = shape
    nrow = min(nrow, images.shape[0])
    rows = -(-images.shape[0] // nrow)
    grid = torch.zeros(rows * (height + PADDING) + PADDING, nrow * (width + PADDING) + PADDING,
                       *images.shape[3:], dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = (i // nrow) * (height + PADDING) + PADDING, (i % nrow) * (width + PADDING) + PADDING
        grid[top:top + height, left:left + width] = image
    return Image.fromarray(grid.numpy(), mode="L" if channels == 1 else "RGB")


def save_grid(pixels: Tensor, shape: tuple[int, int, int], path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(pixels, shape, nrow).save(path)


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
                     shape: tuple[int, int, int], output_dir: Path, tag: str) -> None:
    """samples/<tag>.png from fixed_z, and reconstructions/<tag>.png of test_x (pairs side by side)."""
    for name, pixels in grid_pixels(encoder, decoder, fixed_z, test_x).items():
        save_grid(pixels, shape, output_dir / name / f"{tag}.png")
