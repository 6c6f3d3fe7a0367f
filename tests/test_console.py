"""The console: one live display in a terminal, plain lines elsewhere, and warnings from every process."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import time
import warnings

from rich.console import Console as RichConsole
from rich.progress import ProgressSample

from tests.conftest import REPO, tiny_flags
from vaegan_dist.training.console import Console, TimeLeftColumn, plain_line
from vaegan_dist.training.metrics import StallWatch

RECORD = {"step": 50, "epoch": 0, "enc_loss": 1.0, "dec_loss": 2.0, "dis_loss": 3.0, "d_x": 0.5, "d_x_tilde": 0.4,
          "d_x_p": 0.3, "images_per_s": 1234.0}


def run_in_terminal(args: list[str], timeout: float = 120) -> str:
    """What `python -m vaegan_dist.train ARGS` writes to a pseudo-terminal."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vaegan_dist.train", *args], stdout=terminal,
                               stderr=terminal, env=env, cwd=REPO)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout) == 0, b"".join(chunks).decode()[-3000:]
    return b"".join(chunks).decode()


def test_a_terminal_gets_one_live_display_not_a_line_per_step(tmp_path):
    output = run_in_terminal(tiny_flags(max_steps=30, log_every=10, output_dir=tmp_path))
    assert "processes" in output and "1 process on 1 node, cpu" in output  # the table
    assert "\x1b[" in output  # drawn in place
    lines = output.replace("\r\n", "\n").split("\n")
    # Redrawn in place with \r: a new line only where something is printed above it ("checkpoint: ...").
    assert sum("ETA" in line for line in lines) <= 3
    assert "30/30" in output and "img/s enc" in output
    assert "step      10 |" not in output  # no plain lines
    assert "done: 30 steps (0 skipped) in 0:00:" in output and " img/s; outputs in " in output
    wrote = next(line for line in lines if line.startswith("wrote: "))
    assert "checkpoints/step_0000030/" in wrote and "metrics.jsonl" in wrote and "samples.gif" in wrote
    assert f"`vaegan-sample {tmp_path} --out samples.png`" in output
    assert f"`vaegan-export {tmp_path} my-model`" in output


def test_an_evaluation_is_a_phase_of_the_display_and_counted_in_the_eta():
    console = Console(is_main=True, rank=0)
    console.out = RichConsole(force_terminal=True, file=io.StringIO(), width=200)
    console.start_progress(total_steps=100, step=0, epochs=1, evaluations=2)
    (task,) = console._progress.tasks
    column = TimeLeftColumn()
    now = task.get_time()  # 1 step a second so far: 100 s left
    task._progress.extend([ProgressSample(now - 10.0, 10), ProgressSample(now, 10)])
    assert column.render(task).plain == "ETA 0:01:40 + evaluation"  # the evaluations not yet timed
    console.begin_evaluation("evaluating at step 50")
    assert task.fields["phase"] == "evaluating at step 50"
    console._phase_started -= 30  # an evaluation of 30 s
    console.end_evaluation()
    assert task.fields["phase"] == "" and task.fields["evaluations"] == 1
    assert column.render(task).plain == "ETA 0:02:10"  # 100 s of steps + one more evaluation of 30 s
    console.stop_progress()


def test_a_phase_is_a_plain_line_when_stdout_is_not_a_terminal(capsys):
    console = Console(is_main=True, rank=0)
    console.start_progress(total_steps=100, step=0, epochs=1, evaluations=1)
    console.begin_evaluation("evaluating at step 100")
    console.end_evaluation()
    assert capsys.readouterr().out == "evaluating at step 100\n"


def test_plain_lines_when_stdout_is_not_a_terminal(capsys):
    console = Console(is_main=True, rank=0)
    console.start_progress(total_steps=100, step=0, epochs=1)  # no live display into a pipe
    console.show(RECORD)
    console.advance(60, 0)
    console.stop_progress()
    out = capsys.readouterr().out
    assert out == plain_line(RECORD) + "\n" and "\x1b" not in out
    assert out.startswith("step      50 | epoch   1 | enc 1.0000 dec 2.0000 dis 3.0000")


def test_only_the_main_process_prints(capsys):
    console = Console(is_main=False, rank=1)
    console.table("run", {"a": "b"})
    console.info("hello")
    console.warn("the same on every process")
    console.show(RECORD)
    assert capsys.readouterr() == ("", "")


def test_python_warnings_appear_once_tagged_with_the_rank(capsys):
    with Console(is_main=False, rank=3):
        for _ in range(3):
            warnings.warn("slow path taken", UserWarning, stacklevel=1)
            warnings.warn_explicit("other warning", RuntimeWarning, "lib.py", 7)
    with Console(is_main=True, rank=0):
        warnings.warn_explicit("main's warning", UserWarning, "lib.py", 9)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert err[0].startswith("[rank 3] warning: UserWarning: slow path taken (test_console.py:")
    assert err[1] == "[rank 3] warning: RuntimeWarning: other warning (lib.py:7)"
    assert err[2] == "warning: UserWarning: main's warning (lib.py:9)"
    assert warnings.showwarning is not None and warnings.showwarning.__module__ == "warnings"  # restored


def test_a_run_that_stalls_is_said_once_per_stall():
    """A process stopped by SIGSTOP leaves the others waiting in a collective: after the stall time, each waiting
    process says so (once per stall), long before torch's 30-minute timeout."""
    said: list[str] = []
    with StallWatch(said.append, stall_s=0.2) as stall:
        time.sleep(0.6)
        assert len(said) == 1 and said[0].startswith("no step has finished for 0 minutes: a process may be stopped")
        stall.beat()  # a step finished: a new stall may be said again
        time.sleep(0.1)
        assert len(said) == 1
        time.sleep(0.5)
    assert len(said) == 2
