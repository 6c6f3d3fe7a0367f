"""Resuming as a lineage: `--resume PATH` branches, the same command again continues the branch, and the abandoned
branch's checkpoints and records are set aside (moved, never deleted), where `--resume auto` never finds them."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from tests.conftest import tiny_config
from vaegan_dist.checkpoint.layout import CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.metrics_log import read_records
from vaegan_dist.checkpoint.reading import Checkpoint
from vaegan_dist.training.loop import train


def steps_of(run) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in sorted(checkpoints_dir(run).glob("step_*"))]


def test_resume_path_branches_and_the_same_command_continues_the_branch(tmp_path, capsys):
    run = tmp_path / "run"
    base = dict(output_dir=str(run), save_every=2, keep_last=10, log_every=1)
    assert train(tiny_config(**base, max_steps=8), Accelerator(cpu=True)) == 0
    start = checkpoints_dir(run) / "step_0000004"
    branch = dict(base, resume=str(start))
    assert train(tiny_config(**branch, max_steps=10), Accelerator(cpu=True)) == 0
    out = capsys.readouterr().out
    assert "a new branch from step_0000004; the abandoned branch's 2 later checkpoints (step_0000006 to " in out
    (aside,) = run.glob("abandoned-*")
    assert steps_of(aside) == [6, 8] and [r["step"] for r in read_records(aside / "metrics.jsonl")] == [5, 6, 7, 8]
    assert steps_of(run) == [2, 4, 6, 8, 10]
    assert Checkpoint(checkpoints_dir(run) / "step_0000010").state["branch_from"] == str(start.resolve())

    assert train(tiny_config(**branch, max_steps=12), Accelerator(cpu=True)) == 0  # the same command, again
    assert "step_0000004 started this branch, which stands at step_0000010: continuing" in capsys.readouterr().out
    assert steps_of(run) == [2, 4, 6, 8, 10, 12] and len(list(run.glob("abandoned-*"))) == 1
    assert train(tiny_config(**base, max_steps=14), Accelerator(cpu=True)) == 0  # --resume auto: the branch too
    steps = [r["step"] for r in read_records(run / "metrics.jsonl")]
    assert steps == list(range(1, 15))  # one record a step, each once: no step of the abandoned branch
    assert json.loads((checkpoints_dir(run) / "step_0000014" / "state.json").read_text())["branch_from"] == str(
        start.resolve())


def test_a_resume_that_is_refused_moves_nothing_and_other_settings_start_a_new_branch(tmp_path, capsys):
    run = tmp_path / "run"
    base = dict(output_dir=str(run), save_every=2, keep_last=10, log_every=1)
    assert train(tiny_config(**base, max_steps=6), Accelerator(cpu=True)) == 0
    start = str(checkpoints_dir(run) / "step_0000002")
    with pytest.raises(CheckpointError, match="setting 'latent_dim' is 8"):
        train(tiny_config(**base, resume=start, max_steps=8, latent_dim=8), Accelerator(cpu=True))
    assert steps_of(run) == [2, 4, 6] and not list(run.glob("abandoned-*"))  # nothing moved
    assert train(tiny_config(**base, resume=start, max_steps=8), Accelerator(cpu=True)) == 0
    assert steps_of(run) == [2, 4, 6, 8] and len(list(run.glob("abandoned-*"))) == 1
    # the same PATH with another learning rate is another branch, not the one that stands at step 8
    assert train(tiny_config(**base, resume=start, max_steps=8, lr=1e-5), Accelerator(cpu=True)) == 0
    assert "a new branch from step_0000002" in capsys.readouterr().out
    assert len(list(run.glob("abandoned-*"))) == 2
