"""MNIST from its four IDX files, checked against the published MD5s, and cut into per-process batches.

The whole training set lives on the device as uint8; a batch is one indexing operation. Each epoch has a
fresh permutation derived from (seed, epoch), identical on every process. Global step s of an epoch takes
images [s·G, (s+1)·G) of the permutation, G = batch × processes, and process r takes the r-th slice of
those. So each image is used at most once per epoch over all processes, and the position in an epoch is one
number, the images already consumed, whatever the process count. The remainder of an epoch that fills no
global batch (96 images at G = 128) is dropped; the next epoch's permutation differs.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BUNDLED_DIR = Path(__file__).parent / "mnist"

# The published MD5 of each decompressed file.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes


class DataError(RuntimeError):
    """MNIST cannot be loaded. The message names the file and the fix."""


def _find(data_dir: Path, name: str) -> Path | None:
    """The file `name` or `name.gz` in data_dir, or in torchvision's layout under it (MNIST/raw)."""
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _download(data_dir: Path) -> None:
    """Fetches the four files with torchvision's MNIST download (needs the network)."""
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(data_dir), train=train, download=True)


def locate(data_dir: str | Path | None, name: str) -> Path:
    """The path of one MNIST file, downloading all four into a user's data_dir if they are missing."""
    folder = BUNDLED_DIR if data_dir is None else Path(data_dir)
    path = _find(folder, name)
    if path is not None:
        return path
    if folder == BUNDLED_DIR:
        raise DataError(f"the bundled MNIST file {name}.gz is missing from {folder}: reinstall vaegan-dist "
                        "or restore the file from the repository (git checkout -- vaegan_dist/mnist)")
    try:
        _download(folder)
    except Exception as err:
        reason = " ".join(str(err).split())  # torchvision's message spans lines
        raise DataError(f"MNIST file {name} not found in {folder}, and downloading it failed ({reason}). "
                        "Copy the four MNIST IDX files (.gz or not) there, or leave out --data-dir to use "
                        "the copy bundled with vaegan-dist.") from None
    path = _find(folder, name)
    if path is None:
        raise DataError(f"MNIST file {name} is still missing from {folder} after downloading it")
    return path


def read_idx(path: Path, name: str) -> Tensor:
    """The uint8 array in an IDX file (gzipped or not), after checking its header and MD5."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:  # zlib: damage inside the compressed data
        raise DataError(f"cannot read MNIST file {path} ({err}): it is truncated or damaged; "
                        "replace it with a fresh copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise DataError(f"MNIST file {path} has no unsigned-byte IDX header: replace it with a fresh copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + torch.Size(shape).numel():
        raise DataError(f"MNIST file {path}: its IDX header promises shape {shape}, which does not match "
                        f"its {len(raw)} bytes; replace it with a fresh copy")
    digest = hashlib.md5(raw).hexdigest()
    if digest != MNIST_MD5[name]:
        raise DataError(f"MNIST file {path} is corrupt: its contents have MD5 {digest}, not the published "
                        f"{MNIST_MD5[name]}; replace it with a fresh copy")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_mnist(data_dir: str | Path | None, split: str) -> tuple[Tensor, Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of 'train' (60k) or 'test' (10k)."""
    prefix = SPLIT_PREFIX[split]
    images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    images = read_idx(locate(data_dir, images_name), images_name)
    labels = read_idx(locate(data_dir, labels_name), labels_name)
    return images, labels


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for the stream that (seed, *keys) names, e.g. (seed, epoch): numpy's SeedSequence hashes
    them, so nearby tuples give unrelated streams, the same on every machine and Python version."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


def epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    """The order of the training set in one epoch: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))
    return torch.randperm(num_images, generator=generator)


class ShardedBatches:
    """This process's batches of one epoch, cut from uint8 images held on the device."""

    def __init__(self, images: Tensor, batch_size: int, num_processes: int, process_index: int,
                 seed: int) -> None:
        self.images = images.reshape(images.shape[0], -1)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def steps_per_epoch(self, images_seen: int = 0) -> int:
        """Global steps left in an epoch of which `images_seen` images are already consumed."""
        return (self.images.shape[0] - images_seen) // self.global_batch

    def indices(self, epoch: int, images_seen: int = 0) -> Iterator[Tensor]:
        """This process's image indices for each remaining step of the epoch."""
        order = epoch_permutation(self.images.shape[0], self.seed, epoch).to(self.images.device)
        first = images_seen + self.process_index * self.batch_size
        for step in range(self.steps_per_epoch(images_seen)):
            start = first + step * self.global_batch
            yield order[start: start + self.batch_size]

    def batches(self, epoch: int, images_seen: int = 0) -> Iterator[Tensor]:
        """This process's uint8 batches (B, 784) for each remaining step of the epoch."""
        for index in self.indices(epoch, images_seen):
            yield self.images[index]
