"""The resume policy: which settings a resumed run may change, silently or with a line, and which it may not."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from vaegan_dist.checkpoint.layout import CheckpointError
from vaegan_dist.config import TrainConfig

# Settings that shape the networks' parameters or the data order: a resume that changes them is an error.
# (spectral_norm: the discriminator's weights become parametrizations, with power-iteration vectors.)
ARCHITECTURE_KEYS = ("architecture", "latent_dim", "hidden_dim", "depth", "conv_width", "seed", "spectral_norm",
                     "dataset", "image_size", "channels")
# Settings that say how to run, not what to train: they change on resume without comment.
RUN_KEYS = ("resume", "output_dir", "data_dir", "max_steps", "save_every", "keep_last", "keep_every",
            "log_every", "requeue", "cpu_threads", "mixed_precision", "on_save_error", "max_consecutive_skips",
            "compile")


def config_changes(saved: Mapping[str, Any], config: TrainConfig) -> Iterator[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each training setting the new run changes. Raises CheckpointError
    for a change the checkpoint cannot follow (the network shapes, the data order)."""
    new = config.to_dict()
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != new[key]:
            flag = f"--{key.replace('_', '-')}"
            if isinstance(saved[key], bool):
                flag = flag if saved[key] else f"--no-{flag[2:]}"
            else:
                flag = f"{flag} {saved[key]}"
            raise CheckpointError(f"setting {key!r} is {new[key]!r} but the checkpoint was trained with "
                                  f"{saved[key]!r}: resume with {flag}, or "
                                  "start a new run in another --output-dir (or with --resume none)")
    for key, value in new.items():
        if key not in ARCHITECTURE_KEYS and key not in RUN_KEYS and key in saved and saved[key] != value:
            yield key, saved[key], value


