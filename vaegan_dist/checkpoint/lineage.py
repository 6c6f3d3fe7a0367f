"""Resuming as a lineage. `--resume PATH` (a checkpoint) starts a branch from PATH: the checkpoints of the output
directory newer than PATH, and metrics.jsonl's records past its step, belong to the branch it abandons and are set
aside in `<output_dir>/abandoned-<time>-<id>/` (moved, never deleted, never resumed by `--resume auto`). Each
checkpoint of the branch records where the branch started, so the same command run again continues the branch
from its newest checkpoint instead of going back to PATH."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaegan_dist.checkpoint.layout import BEST, LAST_GOOD, LATEST, CheckpointError, checkpoints_dir, numbered, step_of
from vaegan_dist.checkpoint.metrics_log import METRICS_FILE, MetricsFileError, read_records, write_records
from vaegan_dist.checkpoint.policy import config_changes
from vaegan_dist.checkpoint.reading import newest_complete
from vaegan_dist.config import TrainConfig

BRANCH_KEY = "branch_from"  # in state.json: the checkpoint (its resolved path) the run's branch started from


@dataclass(frozen=True)
class Branch:
    """Where `--resume PATH` leads: the checkpoint to resume (PATH, or the newest of the branch PATH started), the
    origin the branch's checkpoints record, and whether it is a new branch (the later checkpoints go aside)."""

    resume: Path
    origin: str
    new: bool


def same_settings(checkpoint: Path, config: TrainConfig) -> bool:
    try:
        return not list(config_changes(json.loads((checkpoint / "config.json").read_text()), config))
    except CheckpointError:
        return False


def branch_for(named: Path, output_dir: Path, config: TrainConfig, report: Callable[[str], None]) -> Branch:
    """The branch `--resume named` (a verified checkpoint, or a link to one) continues or starts: the branch named
    started, when the output directory's newest checkpoint descends from it and has these settings; else a new one.
    Reads only: every process may ask."""
    named = named.resolve()
    newest = newest_complete(checkpoints_dir(output_dir), report)
    if (newest is not None and newest.resolve() != named and same_settings(newest, config)
            and json.loads((newest / "state.json").read_text()).get(BRANCH_KEY) == str(named)):
        report(f"resume: {named.name} started this branch, which stands at {newest.name}: continuing from there")
        return Branch(newest, str(named), new=False)
    return Branch(named, str(named), new=True)


def set_aside(output_dir: Path, start: Path, report: Callable[[str], None]) -> None:
    """Moves the checkpoints newer than `start` and the records past its step into abandoned-<time>-<id>/ (its
    metrics.jsonl written first: a failure midway loses nothing), and drops the links to what moved. Raises
    CheckpointError."""
    root, step = checkpoints_dir(output_dir), step_of(start.name)
    later = [path for number, path in numbered(root) if number > step and path.resolve() != start.resolve()]
    if not later:
        return
    metrics = output_dir / METRICS_FILE
    try:
        records = read_records(metrics) if metrics.is_file() else []
        folder = Path(tempfile.mkdtemp(prefix=f"abandoned-{time.strftime('%Y%m%dT%H%M%S')}-", dir=output_dir))
        write_records(folder / METRICS_FILE, [record for record in records if record["step"] > step])
        (folder / "checkpoints").mkdir()
        for path in later:
            os.replace(path, folder / "checkpoints" / path.name)
        if metrics.is_file():
            write_records(metrics, [record for record in records if record["step"] <= step])
        for link in (BEST, LAST_GOOD):
            if (root / link).is_symlink() and not (root / link).exists():  # its checkpoint moved
                (root / link).unlink()
        if (root / LATEST).is_file() and not (root / (root / LATEST).read_text().strip()).is_dir():
            (root / LATEST).unlink()  # the next save writes it anew
    except (OSError, MetricsFileError) as err:
        raise CheckpointError(f"setting the abandoned branch aside in {output_dir} failed ({err}): free the disk "
                              "or fix the file, then run again") from None
    moved = sum(record["step"] > step for record in records)
    report(f"resume: a new branch from {start.name}; the abandoned branch's {len(later)} later checkpoint"
           f"{'s' * (len(later) != 1)} ({later[0].name} to {later[-1].name}) and {moved} record{'s' * (moved != 1)} "
           f"of metrics.jsonl are set aside in {folder}")
