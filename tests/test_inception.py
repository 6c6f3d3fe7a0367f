"""FID for any images: torchmetrics' FrechetInceptionDistance behind SampleFID, checked with a small stand-in for
Inception (whose weights this machine cannot download) against the package's own Fréchet distance; and the one
line that says why FID is off."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from vaegan_dist.evaluation.inception import FIDUnavailable, SampleFID, as_rgb, inception_fid
from vaegan_dist.evaluation.statistics import frechet_distance

SHAPE = (3, 8, 8)


class StandIn(nn.Module):
    """A fixed random feature extractor in Inception's place: images (N, 3, H, W) in [0, 1] to 6 features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 6))
        with torch.no_grad():
            self.net[2].weight.copy_(torch.randn(6, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())


def test_sample_fid_is_the_frechet_distance_of_the_features_of_real_images_and_samples():
    images = torch.randint(0, 256, (300, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    real = images.reshape(300, -1).float() / 127.5 - 1  # the same images as pixel rows in [-1, 1]
    decoder = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Tanh())
    fid = SampleFID(images, inception_fid(StandIn()), "cpu")
    z = torch.randn(200, 4, generator=torch.Generator().manual_seed(2))
    features = StandIn()
    with torch.no_grad():
        real_features, fake_features = (features(as_rgb(rows, SHAPE)).double() for rows in (real, decoder(z)))
        expected = frechet_distance(real_features, fake_features)
    assert fid(decoder, z) == pytest.approx(expected, rel=1e-3)
    assert fid(decoder, z) == pytest.approx(expected, rel=1e-3)  # the real side is kept, the fake one replaced
    assert fid(nn.Identity(), real[:150]) < 0.2 * expected  # samples drawn like the real images score near 0


def test_grey_images_become_three_channels():
    rows = torch.linspace(-1, 1, 16).reshape(1, 16)
    images = as_rgb(rows, (1, 4, 4))
    assert images.shape == (1, 3, 4, 4) and torch.equal(images[0, 0], images[0, 2]) and images.min() == 0


def test_without_torchmetrics_or_the_weights_fid_is_off_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(FIDUnavailable, match=r"FID needs torchmetrics and torch-fidelity: pip install"):
        inception_fid()
    monkeypatch.undo()

    class Offline:
        def __init__(self, **kwargs):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr("torchmetrics.image.fid.FrechetInceptionDistance", Offline)
    with pytest.raises(FIDUnavailable, match=r"^FID is off: Inception could not be loaded \(<urlopen error"):
        inception_fid()
