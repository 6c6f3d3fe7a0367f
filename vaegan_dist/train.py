"""The training loop and the command line: `accelerate launch train.py`, `python -m vaegan_dist.train` or
`vaegan-train`, all with the same flags (`--help` lists them)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vaegan_dist.config import ConfigError, TrainConfig, parse_args
from vaegan_dist.console import Console, describe_processes
from vaegan_dist.data import DataError, ShardedBatches, load_mnist
from vaegan_dist.losses import LossTerms
from vaegan_dist.models import build_models, images_to_pixels
from vaegan_dist.pictures import grid_image, grid_pixels, save_epoch_grids
from vaegan_dist.report import ReportError, write_report
from vaegan_dist.step import NETWORKS, train_step
from vaegan_dist.tracking import Tracker, peak_memory_mb

NUM_FIXED_SAMPLES = 64
NUM_RECONSTRUCTED = 32
EXIT_BAD_INPUT = 2


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, float | int]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, accelerator: Accelerator, console: Console) -> None:
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if config.mixed_precision == "fp16" and accelerator.scaler is None:
        console.warn("fp16 needs a GPU; Accelerate runs fp32 here. Use --mixed-precision bf16.")

    set_seed(config.seed)  # the same initial weights on every process (DDP broadcasts rank 0's as well)
    networks = build_models(config)
    optimizers = [torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
                  for net in networks]
    prepared = accelerator.prepare(*networks, *optimizers)
    networks, optimizers = prepared[:3], prepared[3:]
    # The step drives the plain optimizers itself; see train_step for why.
    plain_optimizers = [opt.optimizer for opt in optimizers]
    set_seed(config.seed, device_specific=True)  # each process draws its own dropout masks and noise

    batch_size = config.per_process_batch(accelerator.num_processes)
    train_images, _ = load_mnist(config.data_dir, "train")
    test_images, _ = load_mnist(config.data_dir, "test")
    shards = ShardedBatches(train_images.to(accelerator.device), batch_size, accelerator.num_processes,
                            accelerator.process_index, config.seed)
    if shards.steps_per_epoch() == 0:
        raise ConfigError(f"setting 'batch_size' {batch_size} × {accelerator.num_processes} processes exceeds "
                          f"the {train_images.shape[0]} training images: use a smaller batch")
    fixed_z = torch.randn(NUM_FIXED_SAMPLES, config.latent_dim,
                          generator=torch.Generator().manual_seed(config.seed)).to(accelerator.device)
    test_x = images_to_pixels(test_images[:NUM_RECONSTRUCTED]).to(accelerator.device)
    encoder, decoder, _ = (accelerator.unwrap_model(net) for net in networks)

    steps_per_epoch = shards.steps_per_epoch()
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    tracker = Tracker(console.warn)
    if accelerator.is_main_process:  # one W&B run per job
        tracker.start(config.wandb, {**config.to_dict(), "num_processes": accelerator.num_processes}, output_dir,
                      run_id=None, timeout=config.wandb_timeout)
    console.table("vaegan-dist", {
        "processes": describe_processes(accelerator),
        "mixed precision": accelerator.mixed_precision,
        "batch": f"{batch_size} per process, {shards.global_batch} global",
        "data": f"{train_images.shape[0]} training images, {steps_per_epoch * batch_size} per process per epoch",
        "steps": f"{steps_per_epoch} per epoch, {total_steps} in all",
        "outputs": str(output_dir),
        "resume from": "none (fresh start)",
        f"W&B ({tracker.mode})": tracker.location,
    })
    if tracker.active and tracker.mode == "offline":
        console.info(f"upload the W&B run later with: wandb sync {tracker.location}")
    console.start_progress(total_steps, 0, epochs=-(-total_steps // steps_per_epoch))

    metrics = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process)
    term_sums = torch.zeros(len(LossTerms.names()), device=accelerator.device)
    norm_sums = torch.zeros(len(NETWORKS), device=accelerator.device)
    steps_in_window, skipped_steps, window_start = 0, 0, time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        for batch in shards.batches(epoch):
            result = train_step(networks, plain_optimizers, images_to_pixels(batch), config, accelerator.scaler)
            step += 1
            steps_in_window += 1
            skipped_steps += not result.stepped
            term_sums += result.terms.stacked()
            norm_sums += result.grad_norms.detach().float()
            if step % config.log_every == 0 or step == total_steps:
                terms = accelerator.reduce(term_sums, reduction="mean") / steps_in_window
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch,
                          **{name: value for name, value in zip(LossTerms.names(), terms.tolist(), strict=True)},
                          **{f"grad_norm_{name}": value for name, value in
                             zip(NETWORKS, (norm_sums / steps_in_window).tolist(), strict=True)},
                          "skipped_steps": skipped_steps,
                          "images_per_s": steps_in_window * shards.global_batch / elapsed,
                          "step_time_s": elapsed / steps_in_window,
                          **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in
                             zip(NETWORKS, plain_optimizers, strict=True)},
                          "peak_memory_mb": peak_memory_mb(accelerator.device)}
                metrics.write(record)
                tracker.log(record)
                console.show(record)
                term_sums.zero_()
                norm_sums.zero_()
                steps_in_window, window_start = 0, time.perf_counter()
            if tracker.active and (step % config.image_every == 0 or step == total_steps):
                pixels = grid_pixels(encoder, decoder, fixed_z, test_x)
                tracker.log({"step": step, **{name: grid_image(p) for name, p in pixels.items()}})
            console.advance(step, epoch)
            if step == total_steps:
                break
        epoch_done = step % steps_per_epoch == 0
        if accelerator.is_main_process:
            tag = f"epoch_{epoch + 1:03d}" if epoch_done else f"step_{step:07d}"
            save_epoch_grids(encoder, decoder, fixed_z, test_x, output_dir, tag)
        if step == total_steps:
            break
    accelerator.wait_for_everyone()
    console.stop_progress()
    if accelerator.is_main_process:
        try:
            write_report(output_dir)
        except ReportError as err:
            console.info(f"report: {err}")
    tracker.finish()
    console.info(f"done: {step} steps, {skipped_steps} skipped; outputs in {output_dir}")


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        with Console(accelerator.is_main_process, accelerator.process_index) as console:
            train(dataclasses.replace(config, mixed_precision=accelerator.mixed_precision), accelerator, console)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
