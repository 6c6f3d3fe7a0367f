"""Preemption: SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) on any process becomes a stop that every process agrees on at a
step boundary.

SLURM sends SIGUSR1 (with `--signal=USR1@<seconds>`) or SIGTERM before it preempts or times out a job. The
handler only records the signal; the loop asks `requested()` at each step boundary (and an evaluation before each
of its batches), where one all-reduce makes the verdict the same on every process, so all of them save the same
checkpoint and exit together.
A process started by a launcher (accelerate launch, torchrun) that dies (kill -9) stops the same way: a
watchdog thread sends this process SIGTERM, instead of training on, orphaned, to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from vaegan_dist.training.launch_settings import launcher_words

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_POLL_S = 1.0


class PreemptionWatch:
    """Records the first stop signal this process receives, from entering the `with` block to leaving it.

    Ctrl-C (SIGINT) is a stop like the others, announced at once; a second Ctrl-C quits at once
    (KeyboardInterrupt), saving nothing. After a SIGTERM or SIGUSR1, the process ignores both to its exit: the
    same signal sent twice (by SLURM and by the launcher) still ends it with the first one's exit code.
    """

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.received: signal.Signals | None = None
        self._announce = announce
        self._previous: dict[signal.Signals, Any] = {}
        self._done = threading.Event()

    def __enter__(self) -> PreemptionWatch:
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        launcher = os.getppid()
        if launcher_words(launcher) is not None:
            threading.Thread(target=self._watch_launcher, args=(launcher,), name="launcher-watch", daemon=True).start()
        return self

    def _watch_launcher(self, launcher: int) -> None:
        while not self._done.wait(LAUNCHER_POLL_S):
            if os.getppid() != launcher:  # reparented: the launcher is gone
                self._announce(f"the launcher (process {launcher}) is gone: stopping with a checkpoint")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received in (signal.SIGTERM, signal.SIGUSR1):  # a repeat (SLURM's and the launcher's) keeps its code
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)

    def _record(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._announce("Ctrl-C: stopping at the end of this step, with a checkpoint (Ctrl-C again quits at once, "
                           "unsaved)")
        self.received = self.received or signal.Signals(signum)

    def requested(self, accelerator: Accelerator) -> signal.Signals | None:
        """The stop signal any process has received (the same answer on every process), or None."""
        if accelerator.num_processes == 1:
            return self.received
        signum = torch.tensor([float(self.received or 0)], device=accelerator.device)
        agreed = int(accelerator.reduce(signum, reduction="max").item())
        if agreed:  # a process that learns of the stop here ignores a late repeat too (__exit__)
            self.received = self.received or signal.Signals(agreed)
        return signal.Signals(agreed) if agreed else None


def requeue_slurm_job() -> str:
    """Asks SLURM to requeue this job (`scontrol requeue $SLURM_JOB_ID`); returns what happened, in words."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not requeued: SLURM_JOB_ID is not set (not a SLURM job)"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"warning: scontrol requeue {job_id} failed: {err}"
    if result.returncode != 0:
        return f"warning: scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode}"
    return f"requeued SLURM job {job_id}"
