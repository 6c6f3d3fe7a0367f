"""Weights & Biases and TensorBoard logging that can never stop training.

The main process alone makes a WandbTracker, so a job of any size is one W&B run. `wandb.init` runs on a thread
that is waited for at most `wandb_timeout` seconds; logging hands its values to a worker thread through a
queue, so a W&B service that hangs later costs the training step nothing. Any failure is one warning, after
which the run goes on with its local logs (metrics.jsonl, the PNG grids). wandb is imported only when used.

Every logged dict carries the trainer's global "step", and W&B plots against it (`define_metric`). A
resumed job logs into the same run (the id kept in its checkpoint), from the checkpoint's step on: wandb's
own step counter never has to match, so steps replayed after a preemption are not dropped.
"""

from __future__ import annotations

import os
import shlex
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vaegan_dist.exits import Ending
from vaegan_dist.training.queued_worker import QueuedWorker, first_line
from vaegan_dist.training.tensorboard import TensorBoardTracker

DEFAULT_PROJECT = "vaegan-dist"
WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                   "disabled": "disabled"}


def has_credentials() -> bool:
    """Whether wandb finds an API key (WANDB_API_KEY, .netrc, its settings files) for its base URL.

    No network: the key is not verified. Any failure to tell counts as no key.
    """
    try:
        import wandb
        from wandb.sdk.lib import wbauth

        host = wandb.setup().settings.base_url
        return wbauth.authenticate_session(host=host, source="vaegan-dist", prompt=False,
                                           update_session=False) is not None
    except Exception:
        return False


def resolve_mode(requested: str) -> str:
    """online, offline or disabled. For 'auto': WANDB_MODE if set, else online when an API key is configured."""
    if requested != "auto":
        return requested
    env_mode = WANDB_ENV_MODES.get(os.environ.get("WANDB_MODE", "").lower())
    if env_mode:
        return env_mode
    return "online" if has_credentials() else "offline"


class WandbTracker:
    """The W&B run of a training job. Made on the main process only; its methods never raise.

    Until `start` succeeds (and on every other process) it logs nothing: `active` is False, `run_id` None.
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.mode = "disabled"
        self.location = "disabled"  # where to look at the run: its URL, or its offline directory
        self._warn = warn
        self._run: Any = None
        self._timeout = 0.0
        self._exit_code = 0
        self._offline_root: Path | None = None  # where wandb writes offline-run-* folders
        self._offline_pattern = ""
        self._worker = QueuedWorker("W&B", self._log, self._close, self._failed, warn)

    @property
    def active(self) -> bool:
        return self._run is not None and not self._worker.failed

    @property
    def run_id(self) -> str | None:
        """The W&B run id, to keep in checkpoints so that a resumed job continues the run."""
        return self._run.id if self._run is not None else None

    def start(self, mode: str, config: dict[str, Any], output_dir: Path, run_id: str | None,
              timeout: float) -> None:
        """Starts (or, given run_id, resumes) the run; on failure or after `timeout` seconds, warns once.

        mode: auto, online, offline or disabled. The run's files go to $WANDB_DIR, else output_dir; its project
        is $WANDB_PROJECT, else vaegan-dist. wandb itself reads the other WANDB_* variables (entity, group,
        tags, and WANDB_RUN_ID/WANDB_RESUME when no run_id is given).
        """
        self.mode = resolve_mode(mode)
        if self.mode == "disabled":
            return
        self._timeout = timeout
        result = init_within(timeout, mode=self.mode, project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                             dir=os.environ.get("WANDB_DIR", str(output_dir)), config=config, id=run_id,
                             resume="allow" if run_id else None)
        if "run" not in result:
            reason = (first_line(result["error"]) if "error" in result
                      else f"no answer within {timeout:g} s (--wandb-timeout)")
            self._warn(f"W&B did not start ({reason}); training goes on with local logs only")
            self.location = "failed to start: local logs only"
            return
        self._run = result["run"]
        # run.url would warn in an offline run; its directory is what `wandb sync` uploads.
        self.location = self._run.url if self.mode == "online" else str(Path(self._run.dir).parent)
        self._offline_root = Path(self._run.dir).parent.parent if self.mode == "offline" else None
        self._offline_pattern = f"offline-run-*-{self._run.id}"
        self._worker.put({})  # first, on the worker: plot everything against the trainer's "step"
        self._worker.start()

    def sync_command(self) -> str | None:
        """`wandb sync` of every offline folder of this W&B run (each resumed job writes one), oldest first; None
        unless the run is offline."""
        if self._offline_root is None:
            return None
        folders = sorted(self._offline_root.glob(self._offline_pattern))
        return shlex.join(["wandb", "sync", *map(str, folders)]) if folders else None

    def log(self, values: dict[str, Any]) -> None:
        """Queues `values` (with "step") for W&B; uint8 arrays (H, W[, 3]) become images. Never blocks."""
        if self.active:
            self._worker.put(values)

    def finish(self, exit_code: int = 0) -> None:
        """Sends what is queued and closes the run, waiting at most the timeout given to `start`."""
        if self._run is None:
            return
        self._exit_code = exit_code
        if self._worker.finish(self._timeout):
            self._run = None
        else:
            self._warn(f"W&B did not finish within {self._timeout:g} s; its files are in "
                       f"{Path(self._run.dir).parent} (`wandb sync` uploads them)")

    def _log(self, values: dict[str, Any]) -> None:
        import wandb

        if not values:
            self._run.define_metric("step")
            self._run.define_metric("*", step_metric="step")
            return
        # wandb.Image takes float arrays to be 0..255 already: only uint8 arrays are passed.
        self._run.log({key: wandb.Image(value) if isinstance(value, np.ndarray) else value
                       for key, value in values.items()})

    def _close(self) -> None:
        import wandb

        try:
            if self._exit_code == Ending.PREEMPTED:
                # saved and stopped to be run again: a W&B sweep hands a run marked so out again (same id, same
                # settings), and sweep_trial.sh's --output-dir, keyed by that id, finds its checkpoint
                self._run.mark_preempting()
            self._run.finish(exit_code=self._exit_code)
            # finish() returns before W&B's service has written the run's last records; its teardown waits for
            # them: here, within the timeout, as no exit hook will (exits.leave skips them).
            wandb.teardown()
        except Exception as err:
            self._warn(f"W&B could not finish the run ({first_line(err)})")

    def _failed(self, err: BaseException) -> None:
        self._warn(f"W&B logging failed ({first_line(err)}); training goes on with local logs only")


def init_within(timeout: float, **init: Any) -> dict[str, Any]:
    """{"run": wandb.init(**init)}, or {"error": ...}, or {} when it did not return within `timeout` seconds."""
    result: dict[str, Any] = {}

    def init_run() -> None:
        try:
            import wandb

            wandb.setup(settings=wandb.Settings(silent=True))  # this module says what W&B does
            # console off: wandb's capture of stdout would pass every print through its service.
            result["run"] = wandb.init(**init, settings=wandb.Settings(init_timeout=timeout, finish_timeout=timeout,
                                                                       console="off"))
        except Exception as err:  # wandb raises many kinds; none may stop training
            result["error"] = err

    # A daemon thread: one that never returns does not hold up the process's exit. (If it ever returns a
    # run after the timeout, wandb's exit hook finishes that run.)
    thread = threading.Thread(target=init_run, name="wandb-init", daemon=True)
    thread.start()
    thread.join(timeout)
    return result


class Trackers:
    """The trackers --tracker asks for, behind WandbTracker's interface: what the loop calls goes to each of them.
    mode, run_id are W&B's (disabled and None without it); location names where each one writes."""

    def __init__(self, names: str, warn: Callable[[str], None]) -> None:
        chosen = [] if names == "none" else names.split(",")
        self.wandb = WandbTracker(warn) if "wandb" in chosen else None
        self.tensorboard = TensorBoardTracker(warn) if "tensorboard" in chosen else None
        self._timeout = 30.0

    @property
    def mode(self) -> str:
        return self.wandb.mode if self.wandb else "disabled"

    @property
    def location(self) -> str:
        wandb_location = self.wandb.location if self.wandb else "not used (--tracker)"
        if self.tensorboard is None:
            return wandb_location
        return f"{wandb_location}; TensorBoard: {self.tensorboard.location}"

    @property
    def active(self) -> bool:
        return any(t is not None and t.active for t in (self.wandb, self.tensorboard))

    @property
    def run_id(self) -> str | None:
        return self.wandb.run_id if self.wandb else None

    def sync_command(self) -> str | None:
        return self.wandb.sync_command() if self.wandb else None

    def start(self, mode: str, config: dict[str, Any], output_dir: Path, run_id: str | None,
              timeout: float, step: int = 0) -> None:
        """Starts each tracker for a run that begins (or resumes) at `step`."""
        self._timeout = timeout
        if self.wandb:
            self.wandb.start(mode, config, output_dir, run_id, timeout)
        if self.tensorboard:
            self.tensorboard.start(output_dir, config, step)

    def log(self, values: dict[str, Any]) -> None:
        for tracker in (self.wandb, self.tensorboard):
            if tracker is not None:
                tracker.log(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb:
            self.wandb.finish(exit_code)
        if self.tensorboard:
            self.tensorboard.finish(exit_code, self._timeout)
