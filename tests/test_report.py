"""Pictures of a run: loss curves from metrics.jsonl, the samples GIF, and the vaegan-report command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from vaegan_dist.evaluation.report import ReportError, training_records, write_report


def fake_run(output_dir, steps=(10, 20, 30), epochs=3):
    """An output directory as training leaves it: metrics.jsonl and samples/epoch_NNN.png."""
    output_dir.mkdir(exist_ok=True)
    keys = ("enc_loss", "dec_loss", "dis_loss", "d_x", "d_x_tilde", "d_x_p")
    lines = [json.dumps({"step": s, "epoch": 0, **{k: 1 / s for k in keys}}) for s in steps]
    (output_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (output_dir / "samples").mkdir()
    for epoch in range(1, epochs + 1):
        Image.fromarray(np.full((242, 242, 3), 40 * epoch, np.uint8)).save(output_dir / "samples" /
                                                                             f"epoch_{epoch:03d}.png")


def test_vaegan_report_draws_the_curves_and_the_gif(tmp_path):
    fake_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.cli.report", str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    names = ["samples.gif", "loss_curves.png", "discriminator_outputs.png"]
    assert result.stdout.split() == [str(tmp_path / name) for name in names]
    for name in names[1:]:
        assert Image.open(tmp_path / name).size == (700, 400)
    gif = Image.open(tmp_path / "samples.gif")
    assert (gif.n_frames, gif.size) == (3, (242, 256))  # one frame per epoch, a caption strip on top
    for frame in range(3):
        gif.seek(frame)
        assert np.asarray(gif.convert("L"))[20:, :].mean() == pytest.approx(40 * (frame + 1), abs=1)


def test_a_resumed_runs_repeated_steps_count_once_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "x": 1}\n{"step": 10, "x": 2}\n{"step": 10, "x": 3}\n{"step": 15, "x": 4}\n'
                    '{"step": 5, "x": 5}\n{"step": 20, "x"')
    assert training_records(path) == [{"step": 5, "x": 5}, {"step": 10, "x": 3}, {"step": 15, "x": 4}]
    path.write_text('{"step": 5}\nnot json\n{"step": 10}\n')
    with pytest.raises(ReportError, match="line 2 is not JSON"):
        training_records(path)


def test_without_matplotlib_the_gif_is_still_written_and_the_error_says_what_to_install(tmp_path, monkeypatch):
    fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ReportError, match=r"pip install 'vaegan-dist\[report\]'"):
        write_report(tmp_path)
    assert (tmp_path / "samples.gif").is_file() and not (tmp_path / "loss_curves.png").exists()


def test_vaegan_report_on_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    for target in (tmp_path / "absent", tmp_path):
        result = subprocess.run([sys.executable, "-m", "vaegan_dist.cli.report", str(target)], capture_output=True,
                                text=True, cwd=REPO, timeout=120)
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and "give the output directory of a run" in line


def test_evaluation_records_are_not_curve_points(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "enc_loss": 1.0}\n{"step": 5, "epoch": 0, "eval/fid": 9.0}\n')
    assert training_records(path) == [{"step": 5, "enc_loss": 1.0}]


def test_the_gif_takes_every_picture_a_run_wrote_in_order_and_in_colour(tmp_path):
    """A --max-steps run that ended mid-epoch wrote samples/step_NNNNNNN.png: its frame comes after the epochs'."""
    fake_run(tmp_path, epochs=2)
    red = np.zeros((242, 242, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(tmp_path / "samples" / "step_0000150.png")
    write_report(tmp_path)
    gif = Image.open(tmp_path / "samples.gif")
    assert gif.n_frames == 3
    gif.seek(2)
    assert np.asarray(gif.convert("RGB"))[20:, :].mean(axis=(0, 1)) == pytest.approx([200, 0, 0], abs=2)


def test_vaegan_report_says_why_there_is_no_gif(tmp_path):
    fake_run(tmp_path, epochs=0)
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.cli.report", str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "no samples.gif: " in result.stdout
    assert "holds no sample pictures" in result.stdout
