"""`vaegan-sample DIRECTORY --mode MODE --out FILE`: images from a checkpoint or export directory, as files.

Modes (--count N sets how many):
  samples      N images (default 64) decoded from z ~ N(0, I) (--prior mixture: a mixture fitted to the
               codes of training images), seeded with --seed
  reconstruct  N test images (default 32), each beside its reconstruction Dec(μ(x))
  interpolate  N walks (default 8) of --steps K points from μ(a) to μ(b) for pairs (a, b) of test images
  attribute    N test images without --attribute (default 8), each beside Dec(μ(x)) and Dec(μ(x) + v), v the
               mean code of the test images with the attribute minus that of those without (the paper's Figure 5):
               on MNIST, Fashion-MNIST or CIFAR-10 a class (--attribute 3), on a folder a column of
               --labels FILE (CelebA's list_attr_celeba.txt: --attribute Smiling)
The test images (MNIST's, or the run's folder's held-out ones; --data-dir moves it) are a random choice seeded
with --seed. The suffix of FILE picks the format:
  .png  a grid, 8 images a row (samples, reconstruct) or one walk a row (interpolate)
  .npy  uint8 with 0 = black, each image (H, W), or (H, W, 3) in colour: (N, ...) samples, (N, 2, ...) image and
        reconstruction, (N, K, ...) walks, (N, 3, ...) image, reconstruction and with the attribute
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
from vaegan_dist.cli.args import ArgumentParser, add_prior_flag, add_weights_flag, device_flag, seed_flag
from vaegan_dist.config import TrainConfig
from vaegan_dist.data.images import load_images
from vaegan_dist.data.labels import has_attribute
from vaegan_dist.data.mnist import DataError
from vaegan_dist.evaluation.pictures import grid_image, reconstruction_pairs, save_grid, to_uint8
from vaegan_dist.evaluation.prior import prior_codes
from vaegan_dist.exits import fail
from vaegan_dist.hub.network_files import ExportError, load_networks
from vaegan_dist.model.latent import add_attribute, attribute_vector, latent_walks
from vaegan_dist.model.networks import eval_mode, images_to_pixels

MODES = {"samples": 64, "reconstruct": 32, "interpolate": 8, "attribute": 8}  # mode: default count
FORMATS = {"samples": (".png", ".npy"), "reconstruct": (".png", ".npy"), "interpolate": (".png", ".npy", ".gif"),
           "attribute": (".png", ".npy")}
GRID_ROW = 8
MAX_COUNT, MAX_STEPS = 100_000, 1_000  # a .npy of 100,000 MNIST samples is 78 MB; of CelebA 64×64 crops, 1.2 GB
FRAME_MS = 120


def chosen(count: int, total: int, seed: int) -> Tensor:
    """`count` distinct indices of `total`, chosen at random with `seed`."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


def chosen_test_images(images: Tensor, count: int, seed: int, device: torch.device | str) -> Tensor:
    """`count` distinct test images (count, C·H·W) in [-1, 1], chosen at random with `seed`."""
    return images_to_pixels(images[chosen(count, len(images), seed)]).to(device)


def save_gif(walks: Tensor, shape: tuple[int, int, int], path: Path) -> None:
    """Frame t shows step t of every walk (N, K, C·H·W) in one grid; the frames go there and back."""
    row = math.ceil(math.sqrt(walks.shape[0]))
    steps = [*range(walks.shape[1]), *range(walks.shape[1] - 2, 0, -1)]
    frames = [grid_image(walks[:, t], shape, nrow=row) for t in steps]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0)


def with_attribute(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, args: argparse.Namespace,
                   count: int) -> Tensor:
    """(count, 3, P): test images without the attribute, their reconstructions, and those with it added."""
    has = has_attribute(config, args.attribute, args.labels, args.data_dir)
    (test_images,) = load_images(config, "test", data_dir=args.data_dir)
    pixels = images_to_pixels(test_images).to(args.device)
    if not 0 < has.sum() < len(has) - count + 1:
        raise DataError(f"attribute {args.attribute!r}: {int(has.sum())} of the {len(has)} test images have it; "
                        f"the vector needs some with and some without, and --count {count} without")
    has = has.to(pixels.device)
    vector = attribute_vector(encoder, pixels[has], pixels[~has])
    without = torch.nonzero(~has).squeeze(1)
    return add_attribute(encoder, decoder, pixels[without[chosen(count, len(without), args.seed)]], vector)


def make(mode: str, encoder: nn.Module, decoder: nn.Module, config: TrainConfig, count: int,
         args: argparse.Namespace) -> Tensor:
    """The pixels of a mode: (N, P) samples, (N, 2, P) images and reconstructions, (N, K, P) walks or (N, 3, P)
    attributes added, P = C·H·W."""
    if mode == "samples":
        z = prior_codes(args.prior, count, args.seed, encoder, config, args.data_dir)
        with eval_mode(decoder):
            return decoder(z.to(args.device)).float()
    if mode == "attribute":
        return with_attribute(encoder, decoder, config, args, count)
    seed, device, steps = args.seed, args.device, args.steps
    (test_images,) = load_images(config, "test", data_dir=args.data_dir)
    if (needed := count if mode == "reconstruct" else 2 * count) > len(test_images):
        raise DataError(f"--mode {mode} --count {count} needs {needed} distinct test images, more than the "
                        f"{len(test_images)} there are: lower --count")
    if mode == "reconstruct":
        chosen = chosen_test_images(test_images, count, seed, device)
        return reconstruction_pairs(encoder, decoder, chosen).reshape(count, 2, -1)
    a, b = chosen_test_images(test_images, 2 * count, seed, device).split(count)
    return latent_walks(encoder, decoder, a, b, steps)


def write(pixels: Tensor, shape: tuple[int, int, int], path: Path, grid_row: int) -> None:
    """pixels from make() to path, in the format its suffix names; a PNG grid has grid_row images a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, to_uint8(pixels, shape).numpy())
    elif path.suffix == ".gif":
        save_gif(pixels, shape, path)
    else:
        save_grid(pixels.reshape(-1, pixels.shape[-1]), shape, path, nrow=grid_row)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="vaegan-sample", description=__doc__,
                            examples=["vaegan-sample pretrained --out samples.png",
                                      "vaegan-sample outputs --mode interpolate --out walks.gif --seed 3"])
    parser.add_argument("directory", type=Path, help="a checkpoint or export directory")
    parser.add_argument("--mode", choices=list(MODES), default="samples", help="what to draw (above)")
    parser.add_argument("--out", type=Path, required=True, help="FILE.png, FILE.npy or FILE.gif")
    parser.add_argument("--count", type=int, default=None, help="how many (default: " +
                        ", ".join(f"{n} for {mode}" for mode, n in MODES.items()) + ")")
    parser.add_argument("--seed", type=seed_flag, default=0, help="seeds z and the choice of test images")
    parser.add_argument("--steps", type=int, default=10, help="points per latent walk (interpolate)")
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the networks run")
    parser.add_argument("--data-dir", default=None, help="the run's images, where they are not where the run had "
                        "them (MNIST: its IDX files; a folder) (default: the run's own, or the bundled MNIST)")
    parser.add_argument("--attribute", default=None, help="attribute mode: a class (0-9) of a labelled data set, "
                        "a --labels column else (default: none)")
    parser.add_argument("--labels", type=Path, default=None, help="attribute mode on a folder: CelebA's "
                        "list_attr_celeba.txt, or a file like it (default: none)")
    add_weights_flag(parser)
    add_prior_flag(parser)
    args = parser.parse_args(argv)
    count = MODES[args.mode] if args.count is None else args.count
    if args.out.suffix not in FORMATS[args.mode]:
        *others, last = FORMATS[args.mode]
        fail(f"--mode {args.mode} writes {', '.join(others)} or {last} files, not "
             f"{args.out.suffix or 'a file without suffix'}: change the suffix of --out")
    if not 1 <= count <= MAX_COUNT or not 2 <= args.steps <= MAX_STEPS:
        fail(f"--count must be from 1 to {MAX_COUNT:,} and --steps from 2 to {MAX_STEPS:,} (more than that does not "
             "fit a file or memory: run the command several times with other --seed values)")
    if args.prior != "normal" and args.mode != "samples":
        fail(f"--prior picks the codes of --mode samples; --mode {args.mode} decodes the codes of test images")
    if (args.mode == "attribute") != (args.attribute is not None):
        fail("--attribute goes with --mode attribute, which needs it: a digit on MNIST, a --labels column else")
    try:
        refuse_output(args.out, "--out")
        config, encoder, decoder = load_networks(args.directory, args.device, args.weights)
        pixels = make(args.mode, encoder, decoder, config, count, args)
    except (ExportError, DataError, OutputError) as err:
        fail(str(err))
    try:
        row = {"interpolate": args.steps, "attribute": 3}.get(args.mode, GRID_ROW)
        write(pixels, config.image_shape, args.out, row)
    except OSError as err:
        fail(f"cannot write --out {args.out} ({err.strerror or err}): choose a writable path")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
