"""Where a run keeps its checkpoints, and how they are named: imports nothing heavy, so that every command can
ask whether a path lies in a checkpoint (vaegan_dist.checkpoint.output_paths).

Layout under <output_dir>/checkpoints/:

    step_0001000/
        config.json                 the resolved TrainConfig
        encoder.safetensors         the unwrapped networks' state_dicts (identical on every process)
        decoder.safetensors
        discriminator.safetensors
        encoder_ema.safetensors     the encoder's and the decoder's moving averages (runs with --ema-decay
        decoder_ema.safetensors     only; checkpoints of version 0.2 hold the decoder's alone)
        optimizers.safetensors      the three Adam states, keys "<network>.<param index>.<name>"
        state.json                  position (step, epoch, images seen in the epoch), world size,
                                    loss-scaler state, W&B run id, every process's weight digest
        rank_<r>.safetensors        process r's RNG states and its open metrics window
        COMPLETE                    the SHA-256 of every file above; written last
    latest                          one line: the name of the newest complete checkpoint
    best                            --keep-best: a relative symbolic link to the checkpoint of the best evaluation,
                                    which pruning keeps
    last_good                       after a divergence: a link to the newest checkpoint written before its first
                                    skipped step, which pruning keeps

No pickle anywhere: loading runs neither `pickle` nor `torch.load`, only safetensors and `json`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
LATEST = "latest"
BEST = "best"
LAST_GOOD = "last_good"
NAME_PATTERN = re.compile(r"^step_(\d+)$")
STEP_DIR = re.compile(r"^(\.tmp-)?step_\d+$")  # a checkpoint, or one being written
WEIGHTS = ("ema", "raw")  # which networks to read: their moving averages where a checkpoint has them, or the trained


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or used. The message names the checkpoint and the fix."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(name: str) -> int:
    """The step of a checkpoint named step_NNNNNNN."""
    return int(NAME_PATTERN.match(name).group(1))


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def numbered(root: Path) -> list[tuple[int, Path]]:
    """The step_* directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
