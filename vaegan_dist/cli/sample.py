"""`vaegan-sample DIRECTORY --mode MODE --out FILE`: digits from a checkpoint or export directory, as files.

Modes (--count N sets how many):
  samples      N digits (default 64) decoded from z ~ N(0, I), seeded with --seed
  reconstruct  N test digits (default 32), each beside its reconstruction Dec(μ(x))
  interpolate  N walks (default 8) of --steps K points from μ(a) to μ(b) for pairs (a, b) of test digits
The test digits are a random choice seeded with --seed. The suffix of FILE picks the format:
  .png  a grid, 8 digits a row (samples, reconstruct) or one walk a row (interpolate)
  .npy  uint8 with 0 = black: (N, 28, 28) samples, (N, 2, 28, 28) digit and reconstruction, (N, K, 28, 28) walks
  .gif  interpolate only: frame t holds step t of every walk, there and back
It runs on the GPU when there is one (--device picks).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vaegan_dist.checkpoint.output_paths import OutputError, refuse_output
from vaegan_dist.cli.args import ArgumentParser, add_weights_flag, device_flag, seed_flag
from vaegan_dist.data.mnist import DataError, load_mnist
from vaegan_dist.evaluation.pictures import grid_image, reconstruction_pairs, save_grid, to_uint8
from vaegan_dist.evaluation.scores import prior_samples
from vaegan_dist.exits import fail
from vaegan_dist.hub.network_files import ExportError, load_networks
from vaegan_dist.model.mlp import IMAGE_PIXELS
from vaegan_dist.model.networks import eval_mode, images_to_pixels

MODES = {"samples": 64, "reconstruct": 32, "interpolate": 8}  # mode: default count
FORMATS = {"samples": (".png", ".npy"), "reconstruct": (".png", ".npy"), "interpolate": (".png", ".npy", ".gif")}
GRID_ROW = 8
NUM_TEST_IMAGES = 10_000
FRAME_MS = 120


def chosen_test_digits(count: int, seed: int, device: torch.device | str) -> Tensor:
    """`count` ≤ 10k distinct test digits (count, 784) in [-1, 1], chosen at random with `seed`."""
    images, _ = load_mnist(None, "test")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images_to_pixels(images[chosen]).to(device)


def latent_walks(encoder: nn.Module, decoder: nn.Module, a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(N, steps, 784): Dec of `steps` evenly spaced points on the line from μ(a_i) to μ(b_i), ends included."""
    with eval_mode(encoder, decoder):
        mu_a, mu_b = encoder(a)[0], encoder(b)[0]
        t = torch.linspace(0, 1, steps, device=a.device)[None, :, None]
        z = mu_a[:, None] * (1 - t) + mu_b[:, None] * t
        return decoder(z.reshape(-1, z.shape[-1])).float().reshape(len(a), steps, IMAGE_PIXELS)


def save_gif(walks: Tensor, path: Path) -> None:
    """Frame t shows step t of every walk (N, K, 784) in one grid; the frames go there and back."""
    row = math.ceil(math.sqrt(walks.shape[0]))
    steps = [*range(walks.shape[1]), *range(walks.shape[1] - 2, 0, -1)]
    frames = [grid_image(walks[:, t], nrow=row) for t in steps]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0)


def make(mode: str, encoder: nn.Module, decoder: nn.Module, latent_dim: int, count: int, steps: int, seed: int,
         device: torch.device | str) -> Tensor:
    """The pixels of a mode: (N, 784) samples, (N, 2, 784) digits and reconstructions, or (N, K, 784) walks."""
    if mode == "samples":
        with eval_mode(decoder):
            return decoder(prior_samples(count, latent_dim, seed).to(device)).float()
    if mode == "reconstruct":
        return reconstruction_pairs(encoder, decoder, chosen_test_digits(count, seed, device)).reshape(count, 2, -1)
    a, b = chosen_test_digits(2 * count, seed, device).split(count)
    return latent_walks(encoder, decoder, a, b, steps)


def write(pixels: Tensor, path: Path, grid_row: int) -> None:
    """pixels from make() to path, in the format its suffix names; a PNG grid has grid_row digits a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, to_uint8(pixels).numpy())
    elif path.suffix == ".gif":
        save_gif(pixels, path)
    else:
        save_grid(pixels.reshape(-1, IMAGE_PIXELS), path, nrow=grid_row)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="vaegan-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a checkpoint or export directory")
    parser.add_argument("--mode", choices=list(MODES), default="samples")
    parser.add_argument("--out", type=Path, required=True, help="FILE.png, FILE.npy or FILE.gif")
    parser.add_argument("--count", type=int, default=None, help="how many (default: " +
                        ", ".join(f"{n} for {mode}" for mode, n in MODES.items()) + ")")
    parser.add_argument("--seed", type=seed_flag, default=0)
    parser.add_argument("--steps", type=int, default=10, help="points per latent walk (interpolate)")
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu")
    add_weights_flag(parser)
    args = parser.parse_args(argv)
    count = MODES[args.mode] if args.count is None else args.count
    if args.out.suffix not in FORMATS[args.mode]:
        *others, last = FORMATS[args.mode]
        fail(f"--mode {args.mode} writes {', '.join(others)} or {last} files, not "
             f"{args.out.suffix or 'a file without suffix'}: change the suffix of --out")
    if count < 1 or args.steps < 2:
        fail("--count must be at least 1 and --steps at least 2")
    test_digits_needed = {"samples": 0, "reconstruct": count, "interpolate": 2 * count}[args.mode]
    if test_digits_needed > NUM_TEST_IMAGES:
        fail(f"--mode {args.mode} --count {count} needs {test_digits_needed} distinct test digits, more than "
             f"the {NUM_TEST_IMAGES} there are: lower --count")
    try:
        refuse_output(args.out, "--out")
        config, encoder, decoder = load_networks(args.directory, args.device, args.weights)
        pixels = make(args.mode, encoder, decoder, config.latent_dim, count, args.steps, args.seed, args.device)
    except (ExportError, DataError, OutputError) as err:
        fail(str(err))
    try:
        write(pixels, args.out, args.steps if args.mode == "interpolate" else GRID_ROW)
    except OSError as err:
        fail(f"cannot write --out {args.out} ({err.strerror or err}): choose a writable path")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
