"""Commands (a module's main) run in fresh processes forked from a server that has imported the trainer once.

A process started with `python -m vaegan_dist.train` spends some 7 s of CPU before its first step: importing torch,
accelerate and the trainer, torch._dynamo, which torch imports when the first optimizer is made, and matplotlib for
the report at the end. Tests that start many processes, and are not about how a process starts (SIGKILL during
saves, stop and resume), fork them from multiprocessing's fork server instead, which has done those imports once.
Each run is still a process of its own, started from a state that has run nothing, with its own environment,
working directory and output files; it runs `main(argv)` as `python -m MODULE ARGV` would, atexit handlers
included, and is killed like one.

The server imports with OMP_NUM_THREADS=1 (as the tests' subprocesses do), so it holds no OpenMP thread pool that
a forked child could inherit half-made.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
from multiprocessing import forkserver
from pathlib import Path

from tests.conftest import REPO

PRELOAD = ["vaegan_dist.train", "torch._dynamo", "matplotlib.pyplot"]
_context = multiprocessing.get_context("forkserver")


def default_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}


def _ensure_server() -> None:
    """Starts the fork server (once), with OMP_NUM_THREADS=1 while it imports."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _context.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _child(module: str, argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked process: a session of its own, the given environment, cwd and output files, then main."""
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = [module, *argv]
    code = 0
    try:
        importlib.import_module(module).main(argv)
    except SystemExit as stop:  # as the interpreter turns sys.exit's argument into an exit status
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Forked:
    """A running command; `stdout` and `stderr` are files (the same file when `stderr` is None)."""

    def __init__(self, module: str, argv: list[str], stdout: Path, stderr: Path | None = None,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        _ensure_server()
        self.stdout_path, self.stderr_path = Path(stdout), Path(stderr or stdout)
        for path in {self.stdout_path, self.stderr_path}:
            path.write_text("")
        self.process = _context.Process(target=_child, args=(module, [str(a) for a in argv], env or default_env(),
                                                             str(cwd), str(self.stdout_path),
                                                             str(self.stderr_path)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Waits for the end; what it wrote to stdout, and to stderr (None when that is the same file)."""
        self.wait(timeout)
        err = None if self.stderr_path == self.stdout_path else self.stderr_path.read_text()
        return self.stdout_path.read_text(), err

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the process and anything it started (its session's process group), then reaps it."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.process.join()

    def __enter__(self) -> Forked:
        return self

    def __exit__(self, *exc) -> None:
        if self.poll() is None:
            self.kill()


def run(module: str, argv: list[str], tmp_dir: Path, env: dict[str, str] | None = None, timeout: float = 300,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs `python -m MODULE ARGV`, forked, to its end, like subprocess.run(capture_output=True, text=True);
    its output files go into tmp_dir."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out, err = tmp_dir / "forked.stdout", tmp_dir / "forked.stderr"
    with Forked(module, argv, out, err, env=env, cwd=cwd) as forked:
        code = forked.wait(timeout)
    return subprocess.CompletedProcess([module, *argv], code, out.read_text(), err.read_text())
