"""A folder of PNG and JPEG images (at any depth: CelebA's img_align_celeba/ as it unpacks, or your own photos),
decoded once into a uint8 array at the training size and kept as a .npy file that later runs map from disk.

Each image is centre-cropped to a square and resized (Lanczos) to side × side, in grey or colour. The files are
taken in the order of their paths; every TEST_EVERY-th is held out as the test split (reconstructions, pictures),
the rest train. The array lies in the cache directory ($VAEGAN_CACHE, else ~/.cache/vaegan-dist) under a name
derived from the folder, its files' paths, sizes and modification times, the side and the channels: a changed
folder is decoded again, an unchanged one never. It is written atomically (a temporary file renamed into place),
by one process of a node while the others wait (vaegan_dist.training.setup), and decoded by worker processes.
"""

from __future__ import annotations

import hashlib
import os
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vaegan_dist.data.mnist import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_EVERY = 20  # one image in 20 is held out
CACHE_VERSION = 1  # part of every cache file's name: a change of the decoding makes new files


def image_files(folder: Path) -> list[Path]:
    """Every PNG and JPEG file under folder, at any depth, sorted by path; a one-line DataError when none."""
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder} is not a directory: give the folder that holds the images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if len(files) < TEST_EVERY:
        raise DataError(f"--data-dir {folder} holds {len(files)} PNG or JPEG images: a run needs at least "
                        f"{TEST_EVERY} (one in {TEST_EVERY} is held out for testing)")
    return files


def cache_path(folder: Path, files: list[Path], shape: tuple[int, int, int]) -> Path:
    digest = hashlib.sha256(f"{CACHE_VERSION} {folder.resolve()} {shape}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    root = Path(os.environ.get("VAEGAN_CACHE", Path.home() / ".cache" / "vaegan-dist"))
    channels, side, _ = shape
    return root / f"{folder.name}-{side}x{side}x{channels}-{digest.hexdigest()[:16]}.npy"


def decode(file: Path, shape: tuple[int, int, int]) -> np.ndarray | str:
    """The image as uint8 (C, side, side), centre-cropped and resized; or, if it cannot be read, why."""
    channels, side, _ = shape
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            width, height = image.size
            crop = min(width, height)
            left, top = (width - crop) // 2, (height - crop) // 2
            image = image.resize((side, side), Image.Resampling.LANCZOS, box=(left, top, left + crop, top + crop))
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return " ".join(str(err).split()) or type(err).__name__
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def decode_all(files: list[Path], shape: tuple[int, int, int], path: Path) -> None:
    """Decodes every file in worker processes into the array at path (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # nodes may share the cache
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
    try:
        with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for index, (file, pixels) in enumerate(zip(files, pool.map(decode, files, [shape] * len(files),
                                                                        chunksize=64), strict=True)):
                if isinstance(pixels, str):
                    raise DataError(f"cannot read image {file} ({pixels}): delete or replace it")
                array[index] = pixels
        array.flush()
        del array
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def in_split(count: int, split: str) -> np.ndarray:
    """Which of `count` files, in path order, belong to the split ('train' or 'test')."""
    test = np.arange(count) % TEST_EVERY == TEST_EVERY - 1
    return test if split == "test" else ~test


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The split's files, in the order of load_folder's images."""
    files = image_files(Path(folder))
    return [file for file, chosen in zip(files, in_split(len(files), split), strict=True) if chosen]


def load_folder(folder: str | Path, shape: tuple[int, int, int], *splits: str) -> tuple[Tensor, ...]:
    """Each split ('train' or 'test') of the folder's images, uint8 (N, C, side, side), decoded on first use; the
    folder is listed once for all of them (on CelebA, 200,000 files to find and stat)."""
    folder = Path(folder)
    files = image_files(folder)
    path = cache_path(folder, files, shape)
    if not path.is_file():
        try:
            decode_all(files, shape, path)
        except OSError as err:
            raise DataError(f"cannot write the decoded images to {path.parent} ({err.strerror or err}): set "
                            "VAEGAN_CACHE to a writable directory") from None
    array = np.load(path, mmap_mode="r")
    return tuple(torch.from_numpy(np.ascontiguousarray(array[in_split(len(array), split)])) for split in splits)
