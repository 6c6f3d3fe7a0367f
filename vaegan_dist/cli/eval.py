"""`vaegan-eval DIRECTORY`: evaluates a checkpoint or export directory (vaegan_dist.evaluation), prints a table of
the metrics beside their real-data floor and writes them as JSON."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vaegan_dist.checkpoint.output_paths import OutputError, refuse_output
from vaegan_dist.cli.args import ArgumentParser, add_prior_flag, add_weights_flag, device_flag, seed_flag
from vaegan_dist.config import MAX_EVAL_SAMPLES, MIN_EVAL_SAMPLES, TrainConfig
from vaegan_dist.data.images import load_images
from vaegan_dist.data.mnist import DataError
from vaegan_dist.evaluation.classifier import NUM_CLASSES
from vaegan_dist.evaluation.prior import prior_codes
from vaegan_dist.evaluation.reconstruction import evaluate_images, held_out_images
from vaegan_dist.evaluation.scores import DEFAULT_SAMPLES, LATENT_ROWS, RECON_ROWS, SAMPLE_ROWS, Reference, evaluate
from vaegan_dist.exits import fail
from vaegan_dist.hub.network_files import ExportError, load_networks


def histogram_text(scores: dict[str, float], prefix: str = "") -> str:
    return " ".join(f"{100 * scores[f'{prefix}class_{c}']:.1f}" for c in range(NUM_CLASSES))


def results_table(scores: dict[str, float], title: str) -> Table:
    """The metrics beside their real-data floor."""
    table = Table(title=title)
    for column in ("metric", "model", "real data (floor)"):
        table.add_column(column)
    for key, label, form in SAMPLE_ROWS + RECON_ROWS:
        floor = scores.get(f"floor_{key}")
        table.add_row(label, form.format(scores[key]), "—" if floor is None else form.format(floor))
    table.add_row("class histogram (%)", histogram_text(scores), histogram_text(scores, "floor_"))
    for key, label, form, prior in LATENT_ROWS:
        table.add_row(label, form.format(scores[key]), "—" if prior is None else f"{prior:g} (the prior)")
    return table


def mnist_report(args: argparse.Namespace, config: TrainConfig, encoder: nn.Module,
                 decoder: nn.Module) -> tuple[Table, dict]:
    """The classifier's metrics beside their floor, as a table and as the JSON report."""
    z = prior_codes(args.prior, args.samples, args.seed, encoder, config, args.data_dir)
    scores = evaluate(encoder, decoder, config, args.samples, Reference(args.device), args.seed, z)
    table = results_table(scores, f"{args.directory}: {args.samples} samples ({args.prior} prior), seed {args.seed}")
    model = {k: v for k, v in scores.items() if not k.startswith("floor_")}
    floor = {k.removeprefix("floor_"): v for k, v in scores.items() if k.startswith("floor_")}
    return table, {"directory": str(args.directory), "num_samples": args.samples, "seed": args.seed,
                   "prior": args.prior, "model": model, "floor": floor}


def images_report(args: argparse.Namespace, config: TrainConfig, encoder: nn.Module,
                  decoder: nn.Module) -> tuple[Table, dict]:
    """Other images than MNIST: the reconstruction error of up to --samples held-out images, and the FID of
    --samples samples against all of them where Inception can be had."""
    (test_images,) = load_images(config, "test", data_dir=args.data_dir)
    held_out = held_out_images(test_images, args.samples, args.device,
                               lambda line: Console(stderr=True).print(f"warning: {line}", markup=False))
    z = None if held_out.sample_fid is None else prior_codes(args.prior, args.samples, args.seed, encoder, config,
                                                               args.data_dir)  # no samples without FID
    scores = evaluate_images(None, encoder, decoder, held_out, args.samples, config.latent_dim, args.seed, z=z)
    table = Table(title=f"{args.directory}: {min(args.samples, len(test_images))} held-out images")
    for column in ("metric", "model"):
        table.add_column(column)
    table.add_row("reconstruction MSE ↓", f"{scores['recon_mse']:.5f}")
    table.add_row("reconstruction PSNR ↑", f"{scores['recon_psnr']:.2f} dB")
    if "fid" in scores:
        table.add_row(f"FID ↓ ({args.samples} samples, Inception)", f"{scores['fid']:.3f}")
    return table, {"directory": str(args.directory), "num_images": min(args.samples, len(test_images)),
                   "seed": args.seed, "prior": args.prior, "model": scores}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="vaegan-eval", description="Evaluate the networks in a checkpoint or export directory against the "
        "MNIST test set with the shipped classifier (other images: the reconstruction error of the held-out images "
        "and, with the fid extra, the Inception FID of samples); prints a table and writes JSON.",
        examples=["vaegan-eval pretrained", "vaegan-eval outputs --samples 2000 --seed 1 --out eval_seed1.json",
                  "vaegan-eval outputs --prior mixture --out eval_mixture.json"])
    parser.add_argument("directory", type=Path, help="a checkpoint, an export (vaegan-export, pretrained/) or a "
                        "run's output directory (its newest checkpoint)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples to generate (and test "
                        "images to reconstruct, at most 10k); the floor uses as many training images")
    parser.add_argument("--seed", type=seed_flag, default=None, help="seed of the samples' z "
                        "(default: the run's seed; 0 for an export)")
    parser.add_argument("--out", type=Path, default=Path("evaluation.json"), help="where to write the JSON")
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the networks and the classifier run")
    parser.add_argument("--data-dir", default=None, help="a run on other images than the bundled MNIST: where they "
                        "are (default: where the run had them; an export names none)")
    add_weights_flag(parser)
    add_prior_flag(parser)
    args = parser.parse_args(argv)
    if args.samples < MIN_EVAL_SAMPLES:
        fail(f"--samples must be at least {MIN_EVAL_SAMPLES} (precision and recall use 3 nearest neighbours)")
    if args.samples > MAX_EVAL_SAMPLES:
        fail(f"--samples must be at most {MAX_EVAL_SAMPLES}: the floor uses as many training images")
    try:
        refuse_output(args.out, "--out")
        args.out.parent.mkdir(parents=True, exist_ok=True)  # before the evaluation's minute, not after it
        tempfile.TemporaryFile(dir=args.out.parent).close()  # and writable (a read-only or full file system)
    except OutputError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write --out {args.out} ({err.strerror or err}): choose a writable path")
    try:
        config, encoder, decoder = load_networks(args.directory, args.device, args.weights)
        args.seed = config.seed if args.seed is None else args.seed  # the run's, unless told
        table, report = (mnist_report if config.dataset == "mnist" else images_report)(args, config, encoder, decoder)
    except (ExportError, DataError) as err:
        fail(str(err))
    Console().print(table)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        fail(f"cannot write --out {args.out} ({err.strerror or err}): choose a writable path")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
