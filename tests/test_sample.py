"""vaegan-sample on a tiny exported model: every mode and format, seeds, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vaegan_dist.cli.sample import main
from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.pictures import to_uint8
from vaegan_dist.evaluation.scores import prior_samples
from vaegan_dist.hub.network_files import load_networks
from vaegan_dist.model.networks import images_to_pixels


def run(exported, out, *flags):
    main([str(exported), "--out", str(out), "--device", "cpu", *flags])
    return out


def test_samples_npy_holds_the_decoders_digits_as_uint8(exported, tmp_path):
    first = np.load(run(exported, tmp_path / "a.npy", "--count", "10", "--seed", "3"))
    assert first.shape == (10, 28, 28) and first.dtype == np.uint8
    config, _, decoder = load_networks(exported)
    with torch.no_grad():
        expected = to_uint8(decoder(prior_samples(10, config.latent_dim, seed=3)), config.image_shape)
    np.testing.assert_array_equal(first, expected)
    again = np.load(run(exported, tmp_path / "b.npy", "--count", "10", "--seed", "3"))
    other = np.load(run(exported, tmp_path / "c.npy", "--count", "10", "--seed", "4"))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_uint8_images_put_minus_one_at_black_and_one_at_white():
    pixels = torch.tensor([[-1.0] * 392 + [1.0] * 392])
    images = to_uint8(pixels, (1, 28, 28))
    assert images.shape == (1, 28, 28)
    assert images[0, 0, 0] == 0 and images[0, -1, -1] == 255


def test_samples_png_is_a_grid_of_eight_per_row(exported, tmp_path):
    with Image.open(run(exported, tmp_path / "s.png", "--count", "16")) as image:
        assert image.size == (8 * 30 + 2, 2 * 30 + 2)  # 28 pixels and a 2-pixel border per digit


def test_reconstruct_pairs_real_test_digits_with_their_reconstructions(exported, tmp_path):
    pairs = np.load(run(exported, tmp_path / "r.npy", "--mode", "reconstruct", "--count", "6", "--seed", "1"))
    assert pairs.shape == (6, 2, 28, 28)
    test_images, _ = load_mnist(None, "test")
    chosen = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(1))[:6]
    np.testing.assert_array_equal(pairs[:, 0], test_images[chosen].numpy())
    _, encoder, decoder = load_networks(exported)
    with torch.no_grad():
        reconstructions = decoder(encoder(images_to_pixels(test_images[chosen]))[0])
    np.testing.assert_array_equal(pairs[:, 1], to_uint8(reconstructions, (1, 28, 28)))
    with Image.open(run(exported, tmp_path / "r.png", "--mode", "reconstruct", "--count", "8")) as image:
        assert image.size == (8 * 30 + 2, 2 * 30 + 2)


def test_interpolate_walks_from_one_reconstruction_to_another(exported, tmp_path):
    walks = np.load(run(exported, tmp_path / "w.npy", "--mode", "interpolate", "--count", "3", "--steps", "5"))
    assert walks.shape == (3, 5, 28, 28)
    test_images, _ = load_mnist(None, "test")
    chosen = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:6]
    _, encoder, decoder = load_networks(exported)
    with torch.no_grad():
        ends = to_uint8(decoder(encoder(images_to_pixels(test_images[chosen]))[0]), (1, 28, 28))
    np.testing.assert_array_equal(walks[:, 0], ends[:3])
    np.testing.assert_array_equal(walks[:, -1], ends[3:])
    with Image.open(run(exported, tmp_path / "w.gif", "--mode", "interpolate", "--count", "4", "--steps", "5")) as gif:
        assert gif.n_frames == 8  # 5 steps there, 3 back
        assert gif.size == (2 * 30 + 2, 2 * 30 + 2)
    with Image.open(run(exported, tmp_path / "w.png", "--mode", "interpolate", "--count", "3", "--steps", "5")) as grid:
        assert grid.size == (5 * 30 + 2, 3 * 30 + 2)  # one walk per row


@pytest.mark.parametrize(("flags", "message"), [
    (["--out", "x.gif"], "--mode samples writes .png or .npy files, not .gif"),
    (["--out", "x.jpg", "--mode", "interpolate"], "--mode interpolate writes .png, .npy or .gif files, not .jpg"),
    (["--out", "x.png", "--count", "0"], "--count must be from 1 to 100,000"),
    (["--out", "x.png", "--mode", "interpolate", "--count", "6000"], "--count 6000 needs 12000 distinct test images"),
])
def test_bad_requests_exit_2_with_one_line(exported, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported), "--device", "cpu", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_a_directory_without_networks_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_attribute_adds_the_mean_code_difference_of_a_digit_to_images_of_other_digits(exported, tmp_path):
    rows = np.load(run(exported, tmp_path / "a.npy", "--mode", "attribute", "--attribute", "3", "--count", "4"))
    assert rows.shape == (4, 3, 28, 28)
    test_images, labels = load_mnist(None, "test")
    _, encoder, decoder = load_networks(exported)
    pixels = images_to_pixels(test_images)
    with torch.no_grad():
        mu = encoder(pixels)[0]
        vector = mu[labels == 3].mean(dim=0) - mu[labels != 3].mean(dim=0)
        others = torch.nonzero(labels != 3).squeeze(1)
        shown = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:4]]
        expected = to_uint8(decoder(mu[shown] + vector), (1, 28, 28))
    np.testing.assert_array_equal(rows[:, 0], test_images[shown].numpy())
    np.testing.assert_array_equal(rows[:, 2], expected)
    with Image.open(run(exported, tmp_path / "a.png", "--mode", "attribute", "--attribute", "3")) as grid:
        assert grid.size == (3 * 30 + 2, 8 * 30 + 2)  # an image, its reconstruction, with the attribute: a row each


@pytest.mark.parametrize(("flags", "message"), [
    (["--mode", "attribute"], "--attribute goes with --mode attribute"),
    (["--attribute", "3"], "--attribute goes with --mode attribute"),
    (["--mode", "attribute", "--attribute", "smiling"], "on MNIST an attribute is a digit, 0 to 9"),
])
def test_attribute_mistakes_are_one_line(exported, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as error:
        run(exported, tmp_path / "a.png", *flags)
    err = capsys.readouterr().err
    assert error.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
