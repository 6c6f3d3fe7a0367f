"""What a run shows in its terminal or its SLURM log.

The main process alone prints: a table of the run at the start, then one live progress display (epoch,
step, ETA, images/s, losses; the phase, such as an evaluation, while one runs) when stdout is a terminal, or one
plain line per metrics record (every `log_every` steps) and per phase when it is not, with no escape codes. The ETA
counts the evaluations still to come, each as long as the last one took. Warnings go to stderr. Python warnings
raised on the other processes are not lost: each process shows each distinct warning once, tagged with its rank,
so a warning that every process raises appears once per process.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from datetime import timedelta
from types import TracebackType

import torch
from accelerate import Accelerator
from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Table
from rich.text import Text


def plain_line(record: dict[str, float | int]) -> str:
    """One metrics record as a line of text; the epoch counts from 1, as the picture files do."""
    return (f"step {record['step']:>7} | epoch {record['epoch'] + 1:>3} | enc {record['enc_loss']:.4f} "
            f"dec {record['dec_loss']:.4f} dis {record['dis_loss']:.4f} | D(x) {record['d_x']:.3f} "
            f"D(x̃) {record['d_x_tilde']:.3f} D(x_p) {record['d_x_p']:.3f} | "
            f"{record['images_per_s']:.0f} img/s")


def describe_processes(accelerator: Accelerator) -> str:
    """'2 processes on 1 node, cpu' or '16 processes on 2 nodes, cuda (NVIDIA H100 80GB HBM3)'."""
    count = accelerator.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", count))  # set by torchrun and accelerate launch
    nodes = max(count // per_node, 1)
    device = accelerator.device.type
    if device == "cuda":
        device += f" ({torch.cuda.get_device_name(accelerator.device)})"
    return (f"{count} process{'es' * (count > 1)} on {nodes} node{'s' * (nodes > 1)}, {device}")


class StreamConsole(RichConsole):
    """rich's Console, but a stream that closes (`| tee` ended by the terminal's Ctrl-C) or fails never stops the
    run: the console falls quiet and the stream goes to /dev/null (rich's own answer exits instead)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError, ValueError):  # the stream's other writers too (print, the last flush)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())
            os.close(devnull)


class TimeLeftColumn(ProgressColumn):
    """'ETA h:mm:ss': rich's estimate for the steps left, plus the evaluations still to come at the last one's
    length ('+ evaluation' until one has been timed)."""

    def render(self, task: Task) -> Text:
        steps_left = task.time_remaining
        if steps_left is None:
            return Text("ETA -:--:--")
        evaluations, seconds = task.fields["evaluations"], task.fields["evaluation_s"]
        total = steps_left + evaluations * (seconds or 0)
        return Text(f"ETA {timedelta(seconds=round(total))}" + (" + evaluation" if evaluations and not seconds else ""))


class Console:
    """The run's output on this process. Use it as a context manager: it captures Python warnings inside."""

    def __init__(self, is_main: bool, rank: int) -> None:
        self.is_main = is_main
        self.rank = rank
        self.out = StreamConsole(highlight=False)
        self.err = StreamConsole(stderr=True, highlight=False)
        self._progress: Progress | None = None
        self._task = TaskID(0)
        self._phase_started = 0.0
        self._shown_warnings: set[str] = set()
        self._showwarning = warnings.showwarning

    def __enter__(self) -> Console:
        warnings.showwarning = self._show_python_warning
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop_progress()
        warnings.showwarning = self._showwarning

    def table(self, title: str, rows: dict[str, str]) -> None:
        if not self.is_main:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for name, value in rows.items():
            table.add_row(name, Text(value))  # a path may hold [brackets]: no markup
        self._print(self.out, table)

    def info(self, message: str) -> None:
        if self.is_main:
            self._print(self.out, message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning of the run, the same on every process: the main process shows it."""
        if self.is_main:
            self._show_warning(message)

    def warn_here(self, message: str) -> None:
        """A warning of this process alone (tagged with its rank off the main process)."""
        self._show_warning(message)

    def error(self, message: str) -> None:
        """An error that ends the run, the same on every process: the main process shows it."""
        if self.is_main:
            self._print(self.err, Text.assemble(("error:", "red"), " ", message), soft_wrap=True)

    def start_progress(self, total_steps: int, step: int, epochs: int, evaluations: int = 0) -> None:
        """The live display, from `step` of `total_steps`, when stdout is a terminal; `evaluations` to come."""
        if not (self.is_main and self.out.is_terminal):
            return
        self._progress = Progress(
            TextColumn(f"epoch {{task.fields[epoch]}}/{epochs}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TimeLeftColumn(), TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[phase]}", style="bold"), console=self.out, refresh_per_second=4)
        self._task = self._progress.add_task("train", total=total_steps, completed=step, epoch=1, speed="",
                                             losses="", phase="", evaluations=evaluations, evaluation_s=None)
        self._progress.start()

    def advance(self, step: int, epoch: int) -> None:
        """After each step: global steps done, and the epoch (from 0)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, epoch=epoch + 1)

    def begin_evaluation(self, description: str) -> None:
        """An evaluation starts: shown in the live display (or as a line) until end_evaluation."""
        self._phase_started = time.perf_counter()
        if self._progress is not None:
            self._progress.update(self._task, phase=description)
        else:
            self.info(description)

    def end_evaluation(self) -> None:
        if self._progress is not None:
            left = max(self._progress.tasks[self._task].fields["evaluations"] - 1, 0)
            self._progress.update(self._task, phase="", evaluations=left,
                                  evaluation_s=time.perf_counter() - self._phase_started)

    def show(self, record: dict[str, float | int]) -> None:
        """A metrics record: into the live display, or as a plain line."""
        if not self.is_main:
            return
        if self._progress is None:
            self._print(self.out, plain_line(record), markup=False, soft_wrap=True)
            return
        self._progress.update(
            self._task, speed=f"{record['images_per_s']:.0f} img/s",
            losses=f"enc {record['enc_loss']:.3f} dec {record['dec_loss']:.3f} dis {record['dis_loss']:.3f}")

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @staticmethod
    def _print(console: StreamConsole, *objects: object, **options: object) -> None:
        try:
            console.print(*objects, **options)
        except OSError:  # a full disk under a log file
            console.on_broken_pipe()

    def _show_warning(self, message: str) -> None:
        """Once per distinct message; tagged with the rank off the main process."""
        if message in self._shown_warnings:
            return
        self._shown_warnings.add(message)
        if self.is_main:
            self._print(self.err, Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)
        else:
            self._print(self.err, f"[rank {self.rank}] warning: {message}", markup=False, soft_wrap=True)

    def _show_python_warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                             file: object = None, line: str | None = None) -> None:
        self._show_warning(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")
