"""CIFAR-10 from a user's copy: torchvision's (cifar-10-batches-py, Python pickles of numpy arrays, read by an
unpickler that builds nothing but those) or the binary version (cifar-10-batches-bin), in --data-dir or the folder
itself. Never downloaded unasked."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaegan_dist.data.mnist import DataError

BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SIDE, CHANNELS = 32, 3
RECORD = 1 + CHANNELS * SIDE * SIDE  # the binary version: a label byte, then the image's bytes (C, H, W)
# What the batches' pickles need: numpy arrays (written by Python 2's numpy, or as bytes by Python 3's).
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain data, and refuses every other class or function."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read CIFAR-10 file {path} ({err.strerror or err}): replace it") from None


def _from_binary(folder: Path, names: list[str]) -> tuple[Tensor, Tensor]:
    records = [np.frombuffer(_read(folder / f"{name}.bin"), np.uint8) for name in names]
    if bad := next((name for name, r in zip(names, records, strict=True) if r.size % RECORD or not r.size), None):
        raise DataError(f"CIFAR-10 file {folder / bad}.bin is not whole records of {RECORD} bytes: replace it")
    rows = np.concatenate(records).reshape(-1, RECORD)
    return torch.from_numpy(rows[:, 1:].reshape(-1, CHANNELS, SIDE, SIDE).copy()), torch.from_numpy(rows[:, 0].copy())


def _from_pickles(folder: Path, names: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as file:
                batch = ArraysOnly(file, encoding="latin1").load()
            images.append(np.asarray(batch["data"], np.uint8).reshape(-1, CHANNELS, SIDE, SIDE))
            labels.append(np.asarray(batch["labels"], np.uint8))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"CIFAR-10 file {folder / name} is not a CIFAR batch ({err}): replace it") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) uint8) of 'train' (50k) or 'test' (10k)."""
    root, names = Path(data_dir), BATCHES[split]
    for folder in (root / "cifar-10-batches-bin", root):
        if all((folder / f"{name}.bin").is_file() for name in names):
            return _from_binary(folder, names)
    for folder in (root / "cifar-10-batches-py", root):
        if all((folder / name).is_file() for name in names):
            return _from_pickles(folder, names)
    raise DataError(f"CIFAR-10's {split} batches ({', '.join(names)}) are not in {root} nor in its "
                    "cifar-10-batches-py or cifar-10-batches-bin: download them once with python -c \"from "
                    f"torchvision.datasets import CIFAR10; CIFAR10('{root}', download=True)\"")
