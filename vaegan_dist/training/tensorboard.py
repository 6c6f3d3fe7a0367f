"""TensorBoard event files, the other tracker beside W&B (--tracker tensorboard)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vaegan_dist.training.queued_worker import QueuedWorker, first_line

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    """TensorBoard event files in <output_dir>/tensorboard: the records W&B gets (scalars against the trainer's
    "step", the sample and reconstruction grids as images). Made on the main process only; never raises.

    SummaryWriter encodes each image (PNG) in the caller's thread and blocks the caller when its small queue is
    full, so here, as for W&B, a QueuedWorker calls the writer. A write that fails (a full disk, a lost mount) is
    one warning; TensorBoard logging stops, training goes on.
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.location = "off"
        self._warn = warn
        self._writer: Any = None
        self._worker = QueuedWorker("TensorBoard", self._log, self._close, self._failed, warn)

    @property
    def active(self) -> bool:
        return self._writer is not None and not self._worker.failed

    def start(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        """Opens the event file and writes the run's settings into it as a table (TensorBoard's Text tab). A run
        resumed at `step` hides what an earlier job logged after it (it crashed past its last checkpoint, and the
        steps come again), as metrics.jsonl drops it."""
        directory = Path(output_dir) / TENSORBOARD_DIR
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(directory), flush_secs=30, purge_step=step + 1 if step else None)
        except (ImportError, ModuleNotFoundError):
            self._warn("--tracker tensorboard needs the tensorboard package (pip install tensorboard); "
                       "training goes on without it")
            return
        except Exception as err:
            self._warn(f"TensorBoard did not start ({first_line(err)}); training goes on without it")
            return
        self.location = str(directory)
        self._worker.start()
        table = "\n".join(["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in config.items())])
        self._worker.put({"text": table})

    def log(self, values: dict[str, Any]) -> None:
        """Queues `values` (with "step"); numbers become scalars, uint8 arrays (H, W[, 3]) images. Never blocks."""
        if self.active:
            self._worker.put(values)

    def finish(self, exit_code: int = 0, timeout: float = 30.0) -> None:
        """Writes what is queued and closes the event file, waiting at most `timeout` seconds."""
        if self._writer is None:
            return
        if not self._worker.finish(timeout):
            self._warn(f"TensorBoard did not finish writing within {timeout:g} s")
        self._writer = None

    def _log(self, values: dict[str, Any]) -> None:
        if "text" in values:
            self._writer.add_text("config", values["text"], 0)
            return
        step = int(values["step"])
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                self._writer.add_image(key, value, step, dataformats="HWC" if value.ndim == 3 else "HW")
            elif key != "step" and isinstance(value, int | float | np.number) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a write error (disk full) shows here, on the worker's thread

    def _close(self) -> None:
        self._writer.close()

    def _failed(self, err: BaseException) -> None:
        self._warn(f"TensorBoard logging failed ({first_line(err)}); training goes on without it")


