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

from vaegan_dist.config import EXIT_BAD_INPUT, ConfigError, TrainConfig, parse_args
from vaegan_dist.data import DataError, ShardedBatches, load_mnist
from vaegan_dist.evaluation import Reference, evaluate_distributed, evaluation_line
from vaegan_dist.losses import LossTerms
from vaegan_dist.models import build_models, images_to_pixels
from vaegan_dist.pictures import save_epoch_grids
from vaegan_dist.step import NETWORKS, train_step

NUM_FIXED_SAMPLES = 64
NUM_RECONSTRUCTED = 32


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, float | int]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def log_line(record: dict[str, float | int]) -> str:
    return (f"step {record['step']:>7} | epoch {record['epoch']:>3} | enc {record['enc_loss']:.4f} "
            f"dec {record['dec_loss']:.4f} dis {record['dis_loss']:.4f} | D(x) {record['d_x']:.3f} "
            f"D(x̃) {record['d_x_tilde']:.3f} D(x_p) {record['d_x_p']:.3f} | "
            f"{record['images_per_s']:.0f} img/s")


def train(config: TrainConfig, accelerator: Accelerator) -> None:
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if config.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.print("warning: fp16 needs a GPU; Accelerate runs fp32 here. Use --mixed-precision bf16.")

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
    reference = Reference(accelerator.device) if config.eval_samples else None

    steps_per_epoch = shards.steps_per_epoch()
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    accelerator.print(f"vaegan-dist: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
                      f"mixed precision {accelerator.mixed_precision}, batch {batch_size} per process "
                      f"({shards.global_batch} global), {steps_per_epoch} steps per epoch, {total_steps} steps, "
                      f"outputs in {output_dir}")

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
                          "step_time_s": elapsed / steps_in_window}
                metrics.write(record)
                accelerator.print(log_line(record))
                term_sums.zero_()
                norm_sums.zero_()
                steps_in_window, window_start = 0, time.perf_counter()
            eval_due = step == total_steps or (config.eval_every is not None and step % config.eval_every == 0)
            if reference is not None and eval_due:
                eval_start = time.perf_counter()
                scores = evaluate_distributed(accelerator, encoder, decoder, config, config.eval_samples, reference)
                if accelerator.is_main_process:
                    metrics.write({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in scores.items()}})
                    accelerator.print(evaluation_line(step, scores))
                window_start += time.perf_counter() - eval_start  # not training time
            if step == total_steps:
                break
        epoch_done = step % steps_per_epoch == 0
        if accelerator.is_main_process:
            tag = f"epoch_{epoch + 1:03d}" if epoch_done else f"step_{step:07d}"
            save_epoch_grids(encoder, decoder, fixed_z, test_x, output_dir, tag)
        if step == total_steps:
            break
    accelerator.wait_for_everyone()
    accelerator.print(f"done: {step} steps, {skipped_steps} skipped; outputs in {output_dir}")


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        train(dataclasses.replace(config, mixed_precision=accelerator.mixed_precision), accelerator)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
