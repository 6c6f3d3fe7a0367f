"""The convolutional networks' step beside the data path that feeds it, on this machine: one table, one JSON.

    python benchmarks/conv_bench.py                       # 64×64 colour, the paper's networks at width 0.25
    python benchmarks/conv_bench.py --image-size 28 --channels 1 --width 0.25 --precision fp32

Rows, each in images/s:
  decode      a folder's PNGs decoded, centre-cropped and resized into the cached array, once (worker processes;
              --images synthetic images, or --data-dir); what a run's first start costs
  batches     the data path of every step: this process's batch cut from the images on the device and turned into
              pixels in [-1, 1] (ShardedBatches, images_to_pixels)
  ours        the trainer's step (train_step: one forward pass, three routed backward passes, three fused Adams)
  plain       the same networks in a plain loop as a user writes it (benchmarks/baseline.py's plain_step: five
              discriminator calls, a gradient per loss by autograd.grad, three default Adams)
Each step row is timed with bench.py's seconds_per_call, interleaved over --rounds; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import plain_step
from benchmarks.bench import machine_name, seconds_per_call, slug
from vaegan_dist.config import TrainConfig
from vaegan_dist.data.folder import cache_path, decode_all, image_files
from vaegan_dist.data.sharding import ShardedBatches
from vaegan_dist.model.networks import build_models, images_to_pixels
from vaegan_dist.training.cpu import configure_cpu
from vaegan_dist.training.step import adam_optimizers, train_step


def synthetic_folder(root: Path, count: int) -> Path:
    """count PNGs of 178 × 218 noise with a gradient (CelebA's aligned size), so decoding does real work."""
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index:06d}.png")
    return root


def measure_decode(folder: Path, shape: tuple[int, int, int]) -> float:
    files = image_files(folder)
    with tempfile.TemporaryDirectory() as cache:
        path = Path(cache) / cache_path(folder, files, shape).name
        started = time.perf_counter()
        decode_all(files, shape, path)
        return len(files) / (time.perf_counter() - started)


def measure_batches(shape: tuple[int, int, int], batch: int, min_time: float) -> float:
    images = torch.randint(0, 256, (20_000, *shape), dtype=torch.uint8)
    shards = ShardedBatches(images, batch, 1, 0, seed=0)
    batches = shards.batches(0)

    def next_batch() -> None:
        nonlocal batches
        try:
            images_to_pixels(next(batches))
        except StopIteration:
            batches = shards.batches(0)

    return batch / seconds_per_call(next_batch, torch.device("cpu"), min_time)


def step_calls(config: TrainConfig, batch: int, precision: str) -> dict[str, object]:
    """Each step row's call: the trainer's step and the plain loop, on the same fresh networks and batch."""
    calls = {}
    x = torch.rand(batch, config.image_pixels) * 2 - 1
    for name in ("ours", "plain"):
        torch.manual_seed(0)
        networks = build_models(config)
        if precision == "bf16":
            for net in networks:
                net.forward = torch.autocast("cpu", dtype=torch.bfloat16)(net.forward)
        if name == "ours":
            optimizers = adam_optimizers(networks, config)
            calls[name] = lambda n=networks, o=optimizers: train_step(n, o, x, config)
        else:
            optimizers = [torch.optim.Adam(net.parameters(), lr=config.lr) for net in networks]
            step = plain_step(tuple(networks), optimizers, config)
            calls[name] = lambda s=step: s(x)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.25, help="--conv-width")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--images", type=int, default=500, help="synthetic images to decode (without --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=None, help="a folder of images to decode instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per timing")
    parser.add_argument("--output", type=Path, default=None, help="the JSON (default: benchmarks/results-conv-...json)")
    args = parser.parse_args()
    configure_cpu(None)
    config = TrainConfig(architecture="conv", conv_width=args.width, latent_dim=args.latent_dim,
                         dataset="folder", data_dir=".", image_size=args.image_size, channels=args.channels,
                         generator_loss="minimax", batch_size=args.batch_size)
    shape = config.image_shape
    with tempfile.TemporaryDirectory() as root:
        folder = args.data_dir or synthetic_folder(Path(root), args.images)
        rates = {"decode": [measure_decode(folder, shape)]}
    rates["batches"] = [measure_batches(shape, args.batch_size, args.min_time)]
    calls = step_calls(config, args.batch_size, args.precision)
    for _ in range(args.rounds):  # interleaved: the machine's drift hits both alike
        for name, call in calls.items():
            rates.setdefault(name, []).append(args.batch_size / seconds_per_call(call, torch.device("cpu"),
                                                                                  args.min_time))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{machine_name(torch.device('cpu'))}: conv networks at width {args.width}, images {shape}, batch "
          f"{args.batch_size}, {args.precision}")
    print("| row | images/s | × plain |\n| --- | ---: | ---: |")
    for name, rate in medians.items():
        print(f"| {name} | {rate:,.0f} | {rate / medians['plain']:.2f} |")
    out = args.output or Path(__file__).parent / (f"results-conv-{shape[1]}x{shape[0]}-{args.precision}-"
                                               f"{slug(machine_name(torch.device('cpu')))}.json")
    settings = vars(args) | {"data_dir": str(args.data_dir), "output": str(out)}
    results = {"machine": machine_name(torch.device("cpu")), "args": settings, "images_per_s": rates,
               "medians": medians}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
