"""metrics.jsonl: one JSON object per logged step and per evaluation, each with the global "step". Written by
the main process (MetricsLog), cut back to the checkpoint a run resumes, and read by one reader (read_records)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A metrics.jsonl that cannot be read. The message names the file, the line and what to do."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the file, in file order. A torn last line (a running or killed job was writing it) is
    skipped; any other line that is not a JSON object with an integer "step" raises MetricsFileError."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise MetricsFileError(f"cannot read {path} ({err.strerror}): give the output directory of a run") from None
    except UnicodeDecodeError:
        raise MetricsFileError(f"{path} is not text: it is not a run's {METRICS_FILE}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise MetricsFileError(f"{path} line {number} is not JSON: fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(f"{path} line {number} is not a record with a step: fix or delete that line")
        records.append(record)
    return records


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """The file holds these records, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, path)


class MetricsLog:
    """The run's metrics.jsonl, written by the main process only (`enabled`).

    A record is written whole or not at all: a failed write (a full disk) is cut back off the file, costs one
    warning, and the log goes on with the next record.
    """

    def __init__(self, path: Path, enabled: bool, warn: Callable[[str], None]) -> None:
        self.path = path
        self.enabled = enabled
        self._warn = warn
        self._warned = False

    def resume_at(self, step: int) -> None:
        """Cuts the log back to the records of steps up to `step` (where the run resumes; 0 for a fresh start),
        dropping what a crashed run logged past its checkpoint and any torn last line."""
        if self.enabled and self.path.exists():
            write_records(self.path, [record for record in read_records(self.path) if record["step"] <= step])

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._append((json.dumps(record) + "\n").encode())
        except OSError as err:
            if not self._warned:
                self._warn(f"cannot write to {self.path} ({err.strerror}): records are missing from it until "
                           "writing works again; training goes on")
            self._warned = True

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                os.ftruncate(fd, size)  # no torn line for readers, nor for the next record to follow
                raise
        finally:
            os.close(fd)
