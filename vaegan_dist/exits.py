"""How every command ends: its exit codes, and the one way it stops on an error."""

from __future__ import annotations

import logging
import os
import sys
from enum import IntEnum
from typing import NoReturn

EXIT_BAD_INPUT = 2  # a setting, data set or file that cannot be used; the message says what to do
EXIT_CHECKPOINT_FAILED = 3  # a checkpoint could not be written, found or used


class Ending(IntEnum):
    """How a training run ended; the value is the process's exit code."""

    FINISHED = 0
    DIVERGED = 4  # max_consecutive_skips skipped steps in a row; the last good weights are checkpointed
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM or SIGUSR1 after saving a checkpoint; run again to resume
    INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: stopped by Ctrl-C after saving a checkpoint


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """The command's end on an error: one line on stderr (from the first process only, under a multi-process
    launcher, where every process meets the same error), then exit with `code`."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    leave(code)


def leave(code: int) -> NoReturn:
    """Exits with `code`, once every file is closed and W&B finished. A process of a process group destroys the
    group, flushes logging, stdout and stderr, and ends at once (os._exit, no exit hooks): the group's C++
    destructor would otherwise run in the interpreter's teardown, where it can abort a process that finished its
    work (SIGABRT, "terminate called without an active exception"; torch's destroy_process_group says why)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_initialized():
        sys.exit(code)
    distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
