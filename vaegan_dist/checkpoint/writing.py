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
    LAST_GOOD,
    LATEST,
    MARKER,
    CheckpointError,
    checkpoint_name,
    checkpoints_dir,
    file_sha256,
    numbered,
    step_of,
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
    """Deletes complete checkpoints beyond the newest keep_last, except those at multiples of keep_every and those
    `best` and `last_good` link."""
    complete = [path for step, path in numbered(root) if (path / MARKER).is_file()]
    linked = {linked_checkpoint(root, name) for name in (BEST, LAST_GOOD)}
    for path in complete[:-keep_last]:
        if (keep_every is None or step_of(path.name) % keep_every) and path.name not in linked:
            shutil.rmtree(path, ignore_errors=True)


def linked_checkpoint(root: Path, name: str) -> str | None:
    """The name of the checkpoint the link `name` (best, last_good) points at, if any."""
    try:
        return os.readlink(root / name)
    except OSError:
        return None


def link_checkpoint(checkpoint: Path, name: str) -> None:
    """Points the link `name` beside the checkpoints at checkpoint (relative, replaced atomically)."""
    temporary = checkpoint.parent / f"{name}.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(checkpoint.name, temporary)
    os.replace(temporary, checkpoint.parent / name)
    _fsync_dir(checkpoint.parent)


def keep_last_good(root: Path, stuck_step: int) -> Path | None:
    """Links `last_good` to the newest complete checkpoint from before step `stuck_step`, whose weights the skipped
    steps of a divergence kept (they gave non-finite losses); pruning keeps it until a later divergence moves the
    link. Raises OSError where the link cannot be made."""
    before = [path for step, path in numbered(root) if step < stuck_step and (path / MARKER).is_file()]
    if before:
        link_checkpoint(before[-1], LAST_GOOD)
    return before[-1] if before else None
