"""What training reports as it goes: the metrics window averaged into each logged record, metrics.jsonl, and
the checks read off the records (a collapsed discriminator)."""

from __future__ import annotations

import errno
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor

from vaegan_dist.losses import LossTerms
from vaegan_dist.models import Networks
from vaegan_dist.step import StepResult

# A discriminator whose mean outputs on real and reconstructed images both sit within COLLAPSE_MARGIN of 0 or 1
# for COLLAPSE_RECORDS logged records in a row has stopped giving the other networks a useful signal.
COLLAPSE_MARGIN = 0.01
COLLAPSE_RECORDS = 10


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step (and per evaluation), written by the main process only.

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
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, float | int]) -> None:
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


class MetricWindow:
    """This process's sums of every loss and gradient norm since the last logged step."""

    def __init__(self, device: torch.device) -> None:
        self.terms = torch.zeros(len(LossTerms.names()), device=device)
        self.norms = torch.zeros(len(Networks._fields), device=device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.terms += result.terms.stacked()
        self.norms += result.grad_norms.detach().float()
        self.steps += 1

    def to_tensors(self) -> dict[str, Tensor]:
        return {"window.terms": self.terms.cpu(), "window.norms": self.norms.cpu(),
                "window.steps": torch.tensor([self.steps])}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restores to_tensors' output; a window saved with other loss terms (an older version) is left empty:
        it only delays the first record's averages, never the training."""
        if tensors["window.terms"].shape != self.terms.shape or tensors["window.norms"].shape != self.norms.shape:
            return
        self.terms.copy_(tensors["window.terms"])
        self.norms.copy_(tensors["window.norms"])
        self.steps = int(tensors["window.steps"].item())

    def record(self, accelerator: Accelerator, global_batch: int, reset: bool = True) -> dict[str, float]:
        """The window's means over its steps and all processes; then, if `reset`, the window starts afresh."""
        terms = accelerator.reduce(self.terms, reduction="mean") / self.steps
        norms = accelerator.reduce(self.norms, reduction="mean") / self.steps
        elapsed = time.perf_counter() - self.started
        record = {**dict(zip(LossTerms.names(), terms.tolist(), strict=True)),
                  **{f"grad_norm_{name}": value for name, value in zip(Networks._fields, norms.tolist(), strict=True)},
                  "images_per_s": self.steps * global_batch / elapsed, "step_time_s": elapsed / self.steps}
        if reset:
            self.terms.zero_()
            self.norms.zero_()
            self.steps, self.started = 0, time.perf_counter()
        return record


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated on its GPU, or its peak resident size on the CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def discriminator_collapsed(record: dict[str, float]) -> bool:
    """Whether D(x) and D(x̃) both sit at 0 or 1: D wins outright, or has given up."""
    return all(min(record[key], 1 - record[key]) < COLLAPSE_MARGIN for key in ("d_x", "d_x_tilde"))


class CollapseWatch:
    """Counts logged records in a row whose discriminator has collapsed; says so once the count reaches
    COLLAPSE_RECORDS."""

    def __init__(self) -> None:
        self.records = 0

    def warning(self, record: dict[str, float]) -> str | None:
        self.records = self.records + 1 if discriminator_collapsed(record) else 0
        if self.records != COLLAPSE_RECORDS:
            return None
        return (f"the discriminator has collapsed: D(x) = {record['d_x']:.4f} and D(x̃) = {record['d_x_tilde']:.4f} "
                f"for {COLLAPSE_RECORDS} records in a row. Lower --lr, or resume an earlier checkpoint with other "
                "settings.")
