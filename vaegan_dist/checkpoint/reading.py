"""Finding and verifying checkpoints: the one `--resume` names, the newest intact one, and a verified checkpoint's
files read lazily."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load, load_file
from torch import Tensor

from vaegan_dist.checkpoint.contents import check_contents
from vaegan_dist.checkpoint.layout import (
    MARKER,
    CheckpointError,
    checkpoints_dir,
    file_sha256,
    numbered,
)
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES
from vaegan_dist.model.networks import Autoencoder, PerNetwork


def verify(path: Path) -> str | None:
    """None if `path` is a complete, intact checkpoint; otherwise what is wrong with it."""
    marker = path / MARKER
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a directory"
    if not marker.is_file():
        return f"it has no {MARKER} marker (an interrupted save, or not a checkpoint)"
    try:
        hashes = json.loads(marker.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} marker is unreadable"
    required = {f"{n}.safetensors" for n in (*PerNetwork._fields, "optimizers")} | {"state.json", "config.json"}
    if missing := sorted(required - set(hashes)):
        return f"its {MARKER} marker does not list {', '.join(missing)}"
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != expected:
            return f"{name} does not match its SHA-256 (truncated or damaged)"
    return check_contents(path)


def newest_complete(root: Path, report: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint under root; each newer damaged one is reported in one line and skipped."""
    for _, path in reversed(numbered(root)):
        problem = verify(path)
        if problem is None:
            return path
        report(f"skipping checkpoint {path}: {problem}; trying the previous one")
    return None


def resolve_resume(resume: str, output_dir: str | Path, report: Callable[[str], None]) -> Path | None:
    """The checkpoint `--resume` names, or None to start fresh.

    auto: the output directory's newest intact checkpoint, if any; latest: the same, but one must exist;
    none: start fresh; a PATH: that checkpoint (or an output directory's newest), which must be intact.
    """
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        found = newest_complete(checkpoints_dir(output_dir), report)
        if found is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no complete checkpoint in {checkpoints_dir(output_dir)}; "
                                  "use --resume auto to start fresh when there is none")
        return found
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such file or directory; give a checkpoint directory "
                              f"(…/checkpoints/step_NNNNNNN) or an output directory")
    if not (path / MARKER).exists() and (checkpoints_dir(path).is_dir() or path.name == "checkpoints"):
        root = path if path.name == "checkpoints" else checkpoints_dir(path)
        found = newest_complete(root, report)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint in {root}")
        return found
    if problem := verify(path):
        raise CheckpointError(f"--resume {resume}: not a usable checkpoint: {problem}. Name another "
                              f"checkpoint, or use --resume auto to take the newest intact one")
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint directory, read lazily."""

    path: Path

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def network(self, name: str) -> dict[str, Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def has_network(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def load_networks(self, networks: PerNetwork, averages: Autoencoder | None) -> None:
        """Loads the saved weights into the networks, and into averages when given: each saved average, or the
        saved network where the checkpoint has no average of it (a run that starts keeping one there)."""
        for name, module in networks._asdict().items():
            module.load_state_dict(self.network(name))
        for name, average in (averages._asdict() if averages is not None else {}).items():
            file = AVERAGE_FILES[name]
            average.load_state_dict(self.network(file if self.has_network(file) else name))

    def optimizers(self) -> dict[str, Tensor]:
        return load_file(self.path / "optimizers.safetensors")

    def rank_tensors(self, rank: int) -> dict[str, Tensor]:
        return load((self.path / f"rank_{rank}.safetensors").read_bytes())


