"""Writing a checkpoint: every file fsynced into `.tmp-<name>/`, sealed with COMPLETE, renamed into place; then
`latest` moves to it and older checkpoints are pruned (layout: vaegan_dist.checkpoint.layout).

Every process writes its own rank file, and all processes agree on the outcome after each phase: a failure on one
process is a CheckpointError with its reason on all of them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save
from torch import Tensor

from vaegan_dist.checkpoint.layout import (
    BEST,
    LATEST,
    MARKER,
    NAME_PATTERN,
    CheckpointError,
    checkpoint_name,
    checkpoints_dir,
    file_sha256,
    numbered,
)
from vaegan_dist.checkpoint.tensors import (
    cpu_state,
    named_modules,
    non_finite_modules,
    optimizer_tensors,
    weights_digest,
)
from vaegan_dist.config import TrainConfig
from vaegan_dist.model.networks import Autoencoder, PerNetwork


class SavedState(Protocol):
    """What a checkpoint takes of the run's state (vaegan_dist.training.state.TrainState)."""

    @property
    def step(self) -> int: ...

    def to_checkpoint(self, scaler: torch.amp.GradScaler | None) -> tuple[dict[str, Any], dict[str, Tensor]]: ...


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree(accelerator: Accelerator, error: str | None, what: str) -> None:
    """Every process learns every process's error from one phase; any error raises on all of them."""
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    failed = [f"process {rank}: {e}" for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})")


def _attempt(action: Callable[[], None]) -> str | None:
    try:
        action()
    except Exception as err:  # reported on every process by _agree, so no process is left waiting
        return f"{type(err).__name__}: {err}"
    return None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    config: TrainConfig,
    networks: PerNetwork,
    optimizers: PerNetwork,
    state: SavedState,
    averages: Autoencoder | None = None,
) -> Path:
    """Writes checkpoint step_<state.step> on every process together; returns its directory.

    networks: the unwrapped modules; optimizers: the plain torch optimizers. Raises CheckpointError on all
    processes if any of them fails, leaving the previous checkpoints and `latest` untouched.
    """
    root = checkpoints_dir(output_dir)
    step = state.step
    name = checkpoint_name(step)
    modules = named_modules(networks, averages)
    state_entries, rank_tensors = state.to_checkpoint(accelerator.scaler)
    final, tmp = root / name, root / f".tmp-{name}"
    main, rank = accelerator.is_main_process, accelerator.process_index

    def prepare_dir() -> None:
        if main:
            for stale in root.glob(".tmp-*"):  # left behind by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)

    if not_finite := non_finite_modules(modules):
        raise CheckpointError(f"the weights of {', '.join(not_finite)} at step {step} are not finite: not "
                              "saved; resume from the previous checkpoint with a lower --lr")
    _agree(accelerator, _attempt(prepare_dir), f"creating checkpoint {tmp}")
    digests = gather_object([weights_digest(modules)]) if accelerator.num_processes > 1 else [
        weights_digest(modules)]
    if len(set(digests)) != 1:
        raise CheckpointError(f"the processes hold different weights at step {step} (digests "
                              f"{digests}): the replicas diverged; resume from the previous checkpoint")

    def write_files() -> None:
        _fsync_write(tmp / f"rank_{rank}.safetensors", save(rank_tensors))
        if main:
            for file, module in modules.items():
                _fsync_write(tmp / f"{file}.safetensors", save(cpu_state(module)))
            _fsync_write(tmp / "optimizers.safetensors", save(optimizer_tensors(optimizers)))
            full_state = {**state_entries, "world_size": accelerator.num_processes, "replica_digests": digests}
            _fsync_write(tmp / "state.json", (json.dumps(full_state, indent=2) + "\n").encode())
            _fsync_write(tmp / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())

    _agree(accelerator, _attempt(write_files), f"writing checkpoint {tmp}")

    _agree(accelerator, _attempt(lambda: _publish(tmp, final, config) if main else None),
           f"publishing checkpoint {final}")
    return final


def _publish(tmp: Path, final: Path, config: TrainConfig) -> None:
    """Seals the written checkpoint (its COMPLETE marker), moves it into place and `latest` to it, then prunes."""
    root = final.parent
    hashes = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
    _fsync_write(tmp / MARKER, (json.dumps({"sha256": hashes}, indent=2) + "\n").encode())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _fsync_write(root / f"{LATEST}.tmp", f"{final.name}\n".encode())
    os.replace(root / f"{LATEST}.tmp", root / LATEST)
    _fsync_dir(root)
    prune(root, config.keep_last, config.keep_every)


def prune(root: Path, keep_last: int, keep_every: int | None) -> None:
    """Deletes complete checkpoints beyond the newest keep_last, except those at multiples of keep_every and the
    one `best` names."""
    complete = [path for step, path in numbered(root) if (path / MARKER).is_file()]
    best = best_checkpoint(root)
    for path in complete[:-keep_last]:
        step = int(NAME_PATTERN.match(path.name).group(1))
        if (keep_every is None or step % keep_every) and path.name != best:
            shutil.rmtree(path, ignore_errors=True)


def best_checkpoint(root: Path) -> str | None:
    """The name of the checkpoint `best` links to, if any."""
    try:
        return os.readlink(root / BEST)
    except OSError:
        return None


def mark_best(checkpoint: Path) -> None:
    """Points `best` at checkpoint (a relative symbolic link, replaced atomically)."""
    temporary = checkpoint.parent / f"{BEST}.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(checkpoint.name, temporary)
    os.replace(temporary, checkpoint.parent / BEST)
    _fsync_dir(checkpoint.parent)
