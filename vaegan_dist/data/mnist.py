"""MNIST and Fashion-MNIST from their four IDX files: MNIST's bundled with the package or a user's (checked against
the published MD5s), Fashion-MNIST's a user's (checked against their headers and sizes), in --data-dir or in
torchvision's layout under it (MNIST/raw, FashionMNIST/raw)."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import torch
from torch import Tensor

BUNDLED_DIR = Path(__file__).parent / "mnist_idx"

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
    """Images cannot be loaded (MNIST's files, a folder's). The message names the file and the fix."""


def _find(folders: tuple[Path, ...], name: str) -> Path | None:
    """The file `name` or `name.gz` in the first of the folders that holds it."""
    for folder in folders:
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
    path = _find((folder, folder / "MNIST" / "raw"), name)  # or in torchvision's layout under it
    if path is not None:
        return path
    if folder == BUNDLED_DIR:
        raise DataError(f"the bundled MNIST file {name}.gz is missing from {folder}: reinstall vaegan-dist "
                        "or restore the file from the repository (git checkout -- vaegan_dist/data/mnist_idx)")
    try:
        _download(folder)
    except Exception as err:
        reason = " ".join(str(err).split())  # torchvision's message spans lines
        raise DataError(f"MNIST file {name} not found in {folder}, and downloading it failed ({reason}). "
                        "Copy the four MNIST IDX files (.gz or not) there, or leave out --data-dir to use "
                        "the copy bundled with vaegan-dist.") from None
    path = _find((folder, folder / "MNIST" / "raw"), name)
    if path is None:
        raise DataError(f"MNIST file {name} is still missing from {folder} after downloading it")
    return path


def locate_fashion(data_dir: str | Path, name: str) -> Path:
    """The path of one Fashion-MNIST file in data_dir (never downloaded unasked)."""
    path = _find((Path(data_dir) / "FashionMNIST" / "raw", Path(data_dir)), name)  # torchvision's layout first
    if path is None:
        raise DataError(f"Fashion-MNIST file {name} (.gz or not) is not in {data_dir} nor in "
                        f"{Path(data_dir) / 'FashionMNIST' / 'raw'}: download it once with python -c \"from "
                        f"torchvision.datasets import FashionMNIST; FashionMNIST('{data_dir}', download=True)\"")
    return path


def read_idx(path: Path, md5: str | None, what: str = "MNIST") -> Tensor:
    """The uint8 array in an IDX file (gzipped or not), after checking its header, its size and, given one, its
    MD5."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:  # zlib: damage inside the compressed data
        raise DataError(f"cannot read {what} file {path} ({err}): it is truncated or damaged; "
                        "replace it with a fresh copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise DataError(f"{what} file {path} has no unsigned-byte IDX header: replace it with a fresh copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + torch.Size(shape).numel():
        raise DataError(f"{what} file {path}: its IDX header promises shape {shape}, which does not match "
                        f"its {len(raw)} bytes; replace it with a fresh copy")
    digest = hashlib.md5(raw).hexdigest()
    if md5 is not None and digest != md5:
        raise DataError(f"{what} file {path} is corrupt: its contents have MD5 {digest}, not the published "
                        f"{md5}; replace it with a fresh copy")
    if md5 is None and digest in MNIST_MD5.values():  # the same names as MNIST's files: easily mixed up
        raise DataError(f"{what} file {path} is MNIST's, not {what}'s: put {what}'s files there")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def idx_names(split: str) -> list[str]:
    """The names of a split's image and label files (MNIST's and Fashion-MNIST's alike)."""
    return [f"{SPLIT_PREFIX[split]}-{kind}-idx{rank}-ubyte" for kind, rank in (("images", 3), ("labels", 1))]


def load_mnist(data_dir: str | Path | None, split: str) -> tuple[Tensor, Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of 'train' (60k) or 'test' (10k)."""
    images, labels = (read_idx(locate(data_dir, name), MNIST_MD5[name]) for name in idx_names(split))
    return images, labels


def load_fashion_mnist(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's (images (N, 28, 28) uint8, labels (N,) uint8) of 'train' (60k) or 'test' (10k): the same
    file names and format as MNIST's."""
    images, labels = (read_idx(locate_fashion(data_dir, name), None, "Fashion-MNIST") for name in idx_names(split))
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"the Fashion-MNIST files in {data_dir} hold {tuple(images.shape)} images and "
                        f"{len(labels)} labels, not 28 × 28 images with one label each: replace them")
    return images, labels
