"""What training reports as it goes: the metrics window averaged into each logged record, and the checks read off
the records (a collapsed discriminator) or off the clock (a run that stalls). The records go to metrics.jsonl
(vaegan_dist.checkpoint.metrics_log)."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import Tensor

from vaegan_dist.model.losses import LossTerms
from vaegan_dist.model.networks import PerNetwork
from vaegan_dist.training.step import StepResult

# A discriminator whose mean outputs on real and reconstructed images both sit within COLLAPSE_MARGIN of 0 or 1
# for COLLAPSE_RECORDS logged records in a row has stopped giving the other networks a useful signal.
COLLAPSE_MARGIN = 0.01
COLLAPSE_RECORDS = 10
STALL_S = 600.0  # no step, save or evaluation finished for this long: say so (torch's collectives wait 30 minutes)


class MetricWindow:
    """This process's sums of every loss and gradient norm since the last logged step."""

    def __init__(self, device: torch.device) -> None:
        self.terms = torch.zeros(len(LossTerms.names()), device=device)
        self.norms = torch.zeros(len(PerNetwork._fields), device=device)
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
                  **{f"grad_norm_{name}": norm for name, norm in zip(PerNetwork._fields, norms.tolist(), strict=True)},
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


class StallWatch:
    """Says once, from a thread, when no step has finished for STALL_S seconds: a process stopped (SIGSTOP, a
    debugger), hung (a file system) or gone quiet leaves the others waiting in a collective without a word until
    torch's timeout. `beat()` after each step, save and evaluation; use it as a context manager."""

    def __init__(self, warn: Callable[[str], None], stall_s: float | None = None) -> None:
        self._warn, self._stall_s = warn, stall_s or STALL_S
        self._last = time.monotonic()
        self._done = threading.Event()

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> StallWatch:
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        warned_for = None
        while not self._done.wait(min(30.0, self._stall_s / 4)):
            quiet = time.monotonic() - self._last
            if quiet > self._stall_s and warned_for != self._last:
                warned_for = self._last
                self._warn(f"no step has finished for {quiet / 60:.0f} minutes: a process may be stopped (SIGSTOP, "
                           "a debugger) or stuck (a file system, a lost node); the others wait in a collective until "
                           "torch's timeout (30 minutes) ends the run")
