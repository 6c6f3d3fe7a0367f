"""Pictures of a run from its output directory: loss curves from metrics.jsonl and a GIF of the samples.

Written at the end of training, and on demand by `vaegan-report OUTPUT_DIR`, which works on a run still in
progress too:

- loss_curves.png: the losses of the three networks against the global step
- discriminator_outputs.png: the means of D(x), D(x̃) and D(x_p)
- samples.gif: the sample grids from the fixed z, one frame per picture: each epoch's (samples/epoch_NNN.png), then
  that of a run's mid-epoch end (samples/step_NNNNNNN.png)

The curves need matplotlib, an optional extra: pip install 'vaegan-dist[report]'. The GIF needs only Pillow.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from vaegan_dist.checkpoint.metrics_log import METRICS_FILE, MetricsFileError, read_records

CURVES = {  # file: (title, y label, {metrics key: legend label})
    "loss_curves.png": ("Losses", "loss", {"enc_loss": "encoder", "dec_loss": "decoder",
                                          "dis_loss": "discriminator"}),
    "discriminator_outputs.png": ("Discriminator outputs", "mean D", {"d_x": "D(x)", "d_x_tilde": "D(x̃)",
                                                                     "d_x_p": "D(x_p)"}),
}
GIF_FRAME_MS = 400
CAPTION_HEIGHT = 14


class ReportError(RuntimeError):
    """A picture cannot be drawn. The message says what is missing and what to do."""


def training_records(path: Path) -> list[dict[str, float]]:
    """The training records of metrics.jsonl (not the evaluations) by step; where a resumed run logged a step
    again, its last record."""
    try:
        records = read_records(path)
    except MetricsFileError as err:
        raise ReportError(str(err)) from None
    by_step = {record["step"]: record for record in records if not any(key.startswith("eval/") for key in record)}
    return [by_step[step] for step in sorted(by_step)]


def write_loss_curves(records: list[dict[str, float]], output_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("drawing loss curves needs matplotlib: pip install 'vaegan-dist[report]'") from None
    steps = [r["step"] for r in records]
    paths = []
    for name, (title, ylabel, series) in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label in series.items():
            ax.plot(steps, [r.get(key, math.nan) for r in records], label=label, linewidth=1.2)  # a gap if missing
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / name)
        plt.close(fig)
        paths.append(output_dir / name)
    return paths


def sample_pictures(output_dir: Path) -> list[tuple[Path, str]]:
    """The sample grids from the fixed z with their captions, in the run's order: each epoch's
    (samples/epoch_NNN.png), then the pictures of runs that ended mid-epoch (samples/step_NNNNNNN.png)."""
    found = []
    for kind in ("epoch", "step"):
        for png in (output_dir / "samples").glob(f"{kind}_*.png"):
            if png.stem.removeprefix(f"{kind}_").isdigit():
                found.append((kind == "step", int(png.stem.removeprefix(f"{kind}_")), png))
    return [(png, f"{'step' if by_step else 'epoch'} {number}") for by_step, number, png in sorted(found)]


def write_samples_gif(output_dir: Path) -> Path | None:
    """samples.gif, a frame per sample picture, captioned; None when the run has none yet."""
    pictures = sample_pictures(output_dir)
    if not pictures:
        return None
    frames = []
    for png, caption in pictures:
        try:
            grid = Image.open(png)
            grid = grid.convert("RGB" if grid.mode not in ("L", "1", "I") else "L")
        except (OSError, ValueError) as err:
            raise ReportError(f"{png} is not a readable picture ({type(err).__name__}): delete or restore it") from None
        frame = Image.new(grid.mode, (grid.width, grid.height + CAPTION_HEIGHT))
        frame.paste(grid, (0, CAPTION_HEIGHT))
        ImageDraw.Draw(frame).text((2, 1), caption, fill=255 if grid.mode == "L" else (255, 255, 255))
        frames.append(frame)
    path = output_dir / "samples.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def write_report(output_dir: Path) -> list[Path]:
    """The GIF, then the loss curves; the files written. Raises ReportError when the curves cannot be drawn."""
    gif = write_samples_gif(output_dir)
    records = training_records(output_dir / METRICS_FILE)
    if not records:
        raise ReportError(f"{output_dir / METRICS_FILE} has no records yet")
    return [*([gif] if gif else []), *write_loss_curves(records, output_dir)]
