"""The PNG grids: torchvision's make_grid layout, drawn without importing torchvision (it costs 1.4 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from vaegan_dist.models import pixels_to_images
from vaegan_dist.pictures import grid_image, save_grid


@pytest.mark.parametrize("count", [2, 30, 64])  # (make_grid returns a single image unpadded)
def test_grid_matches_torchvision_make_grid(count):
    pixels = torch.rand(count, 784) * 2 - 1
    expected = make_grid(pixels_to_images(pixels), nrow=8, padding=2).mul(255).add(0.5).clamp(0, 255)
    assert np.array_equal(np.asarray(grid_image(pixels)), expected.to(torch.uint8)[0].numpy())


def test_saved_grid_is_white_digits_on_black(tmp_path):
    pixels = -torch.ones(4, 784)
    pixels[:, 0] = 1.0  # one white pixel per digit, the rest black
    save_grid(pixels, tmp_path / "grid.png", nrow=2)
    image = np.asarray(Image.open(tmp_path / "grid.png"))
    assert image.shape == (62, 62) and image.dtype == np.uint8
    assert image[2, 2] == 255 and image[2, 32] == 255 and image[3, 3] == 0 and (image == 255).sum() == 4
