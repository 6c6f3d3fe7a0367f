"""The images of a run, whatever its data set: uint8 (N, C, H, W), the training split and the held-out test one."""

from __future__ import annotations

from torch import Tensor

from vaegan_dist.config import TrainConfig
from vaegan_dist.data.folder import load_folder
from vaegan_dist.data.mnist import load_mnist


def load_images(config: TrainConfig, *splits: str, data_dir: str | None = None) -> tuple[Tensor, ...]:
    """Each split ('train' or 'test') of config's data set at config.image_shape; data_dir replaces the config's."""
    data_dir = data_dir or config.data_dir
    if config.dataset == "mnist":
        return tuple(load_mnist(data_dir, split)[0][:, None] for split in splits)
    return load_folder(data_dir, config.image_shape, *splits)
