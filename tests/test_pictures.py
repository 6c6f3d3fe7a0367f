"""The PNG grids and GIF frames: torchvision's make_grid layout and save_image rounding, drawn without importing
torchvision (it costs 1.4 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from torchvision.utils import make_grid

from vaegan_dist.cli.sample import save_gif
from vaegan_dist.evaluation.pictures import grid_image, save_grid

MNIST = (1, 28, 28)


@pytest.mark.parametrize("count", [2, 30, 64])  # (make_grid returns a single image unpadded)
@pytest.mark.parametrize("shape", [MNIST, (3, 16, 16)], ids=["grey", "colour"])
def test_grid_matches_torchvision_make_grid(count, shape):
    pixels = torch.rand(count, shape[0] * shape[1] * shape[2]) * 2 - 1
    images = pixels.add(1).div(2).clamp(0, 1).reshape(-1, *shape)  # [0, 1], as torchvision's ToTensor gives
    expected = make_grid(images, nrow=8, padding=2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    expected = expected[0] if shape[0] == 1 else expected.permute(1, 2, 0)  # make_grid repeats grey channels
    assert np.array_equal(np.asarray(grid_image(pixels, shape)), expected.numpy())


def test_saved_grid_is_white_digits_on_black(tmp_path):
    pixels = -torch.ones(4, 784)
    pixels[:, 0] = 1.0  # one white pixel per digit, the rest black
    save_grid(pixels, MNIST, tmp_path / "grid.png", nrow=2)
    image = np.asarray(Image.open(tmp_path / "grid.png"))
    assert image.shape == (62, 62) and image.dtype == np.uint8
    assert image[2, 2] == 255 and image[2, 32] == 255 and image[3, 3] == 0 and (image == 255).sum() == 4


def test_gif_frames_are_the_png_grids(tmp_path):
    """One renderer: each frame of a latent-walk GIF is the grid a PNG of the same pixels shows."""
    walks = torch.rand(4, 3, 784) * 2 - 1
    save_gif(walks, MNIST, tmp_path / "walks.gif")
    with Image.open(tmp_path / "walks.gif") as gif:
        frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 4  # there and back: steps 0, 1, 2, 1
    for frame, step in zip(frames, [0, 1, 2, 1], strict=True):
        assert np.array_equal(frame, np.asarray(grid_image(walks[:, step], MNIST, nrow=2)))
