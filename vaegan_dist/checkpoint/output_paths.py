"""No command writes into a checkpoint directory: a checkpoint is verified against the SHA-256 of its files, so one
file written over (or beside) them turns it into a damaged checkpoint that resume skips and pruning deletes.

`refuse_output(path, flag)` is called by every command that writes (vaegan-export, vaegan-sample --out,
vaegan-eval --out, vaegan-report, train.py --output-dir and --data-dir, where MNIST may be downloaded) before it
writes anything. No torch: vaegan-report stays light.
"""

from __future__ import annotations

from pathlib import Path

from vaegan_dist.checkpoint.layout import CHECKPOINTS, LATEST, MARKER, STEP_DIR
from vaegan_dist.config import ConfigError


class OutputError(ConfigError):
    """A path that a command must not write to. The message names it and what to do."""


def checkpoint_holding(path: str | Path) -> Path | None:
    """The checkpoint directory (or a run's checkpoints/ folder) that path is or lies in, else None.

    A checkpoint directory is one with a COMPLETE marker and a state.json (wherever it was copied to), or a step_N
    (or .tmp-step_N) directory in a folder named checkpoints; the checkpoints/ folder of a run is reserved for
    checkpoints too."""
    path = Path(path).absolute().resolve()
    for folder in (path, *path.parents):
        if (folder / MARKER).is_file() and (folder / "state.json").is_file():  # not just any file named COMPLETE
            return folder
        if STEP_DIR.match(folder.name) and folder.parent.name == CHECKPOINTS:
            return folder
        if folder.name == CHECKPOINTS and _holds_checkpoints(folder):
            return folder
    return None


def _holds_checkpoints(folder: Path) -> bool:
    try:
        return (folder / LATEST).is_file() or any(STEP_DIR.match(p.name) for p in folder.iterdir())
    except OSError:  # not a directory, or unreadable: then nothing of ours is in it
        return False


def refuse_output(path: str | Path, flag: str, sources: tuple[str | Path, ...] = (), directory: bool = False) -> None:
    """Raises OutputError if writing `path` (given as `flag`) would write into a checkpoint directory, or over one
    of `sources` (the directories the command reads); with `directory` (a directory the command fills with files),
    also if path is a run's output directory."""
    if (holder := checkpoint_holding(path)) is not None:
        raise OutputError(f"{flag} {path} is inside the checkpoint directory {holder}: a command never writes into "
                          "a checkpoint (it would no longer verify, and resume would skip it); write elsewhere")
    target = Path(path).absolute().resolve()
    for source in sources:
        if target == Path(source).absolute().resolve():
            raise OutputError(f"{flag} {path} is the directory it reads ({source}): write elsewhere")
    if directory and checkpoint_holding(Path(path) / CHECKPOINTS) is not None:
        raise OutputError(f"{flag} {path} is a run's output directory: its files would stand in for its checkpoints; "
                          "write into a directory of its own")
