"""The images of a run, whatever its data set: uint8 (N, C, H, W), the training split and the held-out test one;
and the class labels of the data sets that have them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from vaegan_dist.config import TrainConfig
from vaegan_dist.data.cifar import load_cifar10
from vaegan_dist.data.folder import load_folder
from vaegan_dist.data.mnist import DataError, load_fashion_mnist, load_mnist

DATA_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "folder": "a folder of images"}
# data set: its reader of (images, labels) for a split, from --data-dir (None: MNIST's bundled copy)
LABELLED: dict[str, Callable[[str | Path | None, str], tuple[Tensor, Tensor]]] = {
    "mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_labelled(dataset: str, data_dir: str | None, split: str) -> tuple[Tensor, Tensor]:
    """(images (N, C, H, W) uint8, class labels (N,)) of a split of a data set with classes."""
    images, labels = LABELLED[dataset](data_dir, split)
    return (images[:, None] if images.ndim == 3 else images), labels


def images_dir(config: TrainConfig, data_dir: str | None = None) -> str | None:
    """Where config's images are: data_dir, else the config's (None: MNIST's bundled copy)."""
    data_dir = data_dir or config.data_dir
    if data_dir is None and config.dataset != "mnist":  # an export keeps no paths of the training machine
        raise DataError(f"--dataset {config.dataset} needs its images: give --data-dir DIR (where they are)")
    return data_dir


def load_images(config: TrainConfig, *splits: str, data_dir: str | None = None) -> tuple[Tensor, ...]:
    """Each split ('train' or 'test') of config's data set at config.image_shape; data_dir replaces the config's."""
    data_dir = images_dir(config, data_dir)
    if config.dataset in LABELLED:
        return tuple(load_labelled(config.dataset, data_dir, split)[0] for split in splits)
    return load_folder(data_dir, config.image_shape, *splits)
