"""One run per output directory: a lock file that names its holder, and that a crashed run does not leave stuck.

`<output_dir>/.lock` is created with O_CREAT | O_EXCL, which is atomic on local file systems and on NFS (v3 and
later) and Lustre alike, unlike flock; it holds the holder's host, process id, SLURM job id and start time, and
its holder touches it every HEARTBEAT_S seconds. A lock is taken over when its holder is gone: on this host, its
process no longer exists; elsewhere, the file has not been touched for STALE_AFTER_S seconds; or it is this
SLURM job's own lock from before a requeue. A lock that cannot be read (torn by a full disk) or that names this
very process (a restarted container reuses process ids) is judged by the file's age alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class LockHeld(RuntimeError):
    """Another run holds the output directory. The message names it and what to do."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _gone(holder: dict[str, Any], age_s: float, me: dict[str, Any]) -> bool:
    """Whether the run that wrote `holder` has ended (or is this job's own, requeued)."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return True
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and holder["pid"] != me["pid"]:
        return not _process_exists(holder["pid"])
    return age_s > STALE_AFTER_S


class OutputLock:
    """Holds `<directory>/.lock` from acquire() to release(), touching it every HEARTBEAT_S seconds."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._me: dict[str, Any] = {}

    def acquire(self) -> None:
        """Takes the lock, or raises LockHeld naming the run that holds it."""
        me = _holder()
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age_s = self._read()
                if not _gone(holder, age_s, me):
                    raise LockHeld(self._held_message(holder, age_s)) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._me = me
            self._heartbeat = threading.Thread(target=self._beat, name="output-lock", daemon=True)
            self._heartbeat.start()
            return
        raise LockHeld(f"{self.path.parent} is being taken by another run at this moment: use another --output-dir")

    def release(self) -> None:
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        with contextlib.suppress(OSError):
            if self._read()[0] in (self._me, {}):  # ours, or ours torn (a full disk)
                self.path.unlink()

    def _read(self) -> tuple[dict[str, Any], float]:
        """(the holder as written, seconds since the file was last touched); a file that cannot be read, or
        half-written, is a holder of unknown name, judged by its age."""
        try:
            age_s = time.time() - self.path.stat().st_mtime
        except OSError:
            return {}, float("inf")
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}, age_s
        return (holder if isinstance(holder, dict) else {}), age_s

    def _held_message(self, holder: dict[str, Any], age_s: float) -> str:
        wait = f"it is taken over once {STALE_AFTER_S:.0f} s pass untouched ({STALE_AFTER_S - age_s:.0f} s from now)"
        if not holder:
            return (f"{self.path.parent} holds a lock that cannot be read ({self.path}: empty or torn, as a full disk "
                    f"leaves it), last touched {age_s:.0f} s ago: {wait}; delete it if no run uses this directory")
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        if holder.get("slurm_job_id"):
            who += f" (SLURM job {holder['slurm_job_id']})"
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return (f"{self.path.parent} holds a lock naming this very process ({who}: a restarted container "
                    f"reuses process ids), last touched {age_s:.0f} s ago: {wait}; delete {self.path} if no run "
                    "uses this directory")
        return (f"{self.path.parent} is in use by another run: {who}, started {holder.get('started', '?')}, last "
                f"seen {age_s:.0f} s ago. Use another --output-dir, or stop that run. A run that died leaves its lock "
                f"({self.path}) to the next one: at once on the same host, else after {STALE_AFTER_S:.0f} s of "
                "silence")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)
