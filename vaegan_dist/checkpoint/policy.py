"""The resume policy: which settings a resumed run may change, silently or with a line, and which it may not."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from vaegan_dist.checkpoint.layout import CheckpointError
from vaegan_dist.config import TrainConfig, image_shape_of

# Settings that shape the networks' parameters or the data order: a resume that changes them is an error.
# (spectral_norm: the discriminator's weights become parametrizations, with power-iteration vectors.)
ARCHITECTURE_KEYS = ("architecture", "latent_dim", "hidden_dim", "depth", "conv_width", "encoder_batch_norm", "seed",
                     "spectral_norm", "dataset")
# Compared as the image shape they make (none and 28 are MNIST's alike): a resume that changes it is an error too.
SHAPE_KEYS = ("image_size", "channels")
# Settings that say how to run, not what to train: they change on resume without comment.
RUN_KEYS = ("resume", "output_dir", "data_dir", "max_steps", "save_every", "keep_last", "keep_every",
            "log_every", "requeue", "cpu_threads", "mixed_precision", "on_save_error", "max_consecutive_skips",
            "compile")


def config_changes(saved: Mapping[str, Any], config: TrainConfig) -> Iterator[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each training setting the new run changes. Raises CheckpointError
    for a change the checkpoint cannot follow (the network shapes, the data order). A setting that the checkpoint's
    version did not have counts as its default (an 0.4 checkpoint is --architecture mlp)."""
    new = config.to_dict()
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **saved}
    saved_shape = image_shape_of(saved["dataset"], saved["image_size"], saved["channels"])
    if saved_shape != config.image_shape:
        raise CheckpointError(f"the images are {config.image_shape} (channels, height, width) but the checkpoint was "
                              f"trained on {saved_shape}: resume with --image-size {saved_shape[1]} --channels "
                              f"{saved_shape[0]}, or start a new run in another --output-dir (or with --resume none)")
    for key in ARCHITECTURE_KEYS:
        if saved[key] != new[key]:
            flag = f"--{key.replace('_', '-')}"
            if isinstance(saved[key], bool):
                flag = flag if saved[key] else f"--no-{flag[2:]}"
            else:
                flag = f"{flag} {saved[key]}"
            raise CheckpointError(f"setting {key!r} is {new[key]!r} but the checkpoint was trained with "
                                  f"{saved[key]!r}: resume with {flag}, or "
                                  "start a new run in another --output-dir (or with --resume none)")
    for key, value in new.items():
        if key not in (*ARCHITECTURE_KEYS, *SHAPE_KEYS, *RUN_KEYS) and saved[key] != value:
            yield key, saved[key], value


