"""The training loop and the command line: `accelerate launch train.py`, `python -m vaegan_dist.train` or
`vaegan-train`, all with the same flags (`--help` lists them)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor

from vaegan_dist.checkpoint import (
    Checkpoint,
    CheckpointError,
    Position,
    config_changes,
    load_optimizer_tensors,
    resolve_resume,
    save_checkpoint,
)
from vaegan_dist.config import ConfigError, TrainConfig, parse_args
from vaegan_dist.cpu import keep_freed_memory
from vaegan_dist.data import DataError, ShardedBatches, load_mnist
from vaegan_dist.losses import LossTerms
from vaegan_dist.models import build_models, compile_networks, images_to_pixels
from vaegan_dist.pictures import save_epoch_grids
from vaegan_dist.preemption import PreemptionWatch, requeue_slurm_job
from vaegan_dist.step import NETWORKS, StepResult, adam_optimizers, train_step

NUM_FIXED_SAMPLES = 64
NUM_RECONSTRUCTED = 32
EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT_FAILED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint; run again to resume


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, float | int]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class MetricWindow:
    """This process's sums of every loss and gradient norm since the last logged step."""

    def __init__(self, device: torch.device) -> None:
        self.terms = torch.zeros(len(LossTerms.names()), device=device)
        self.norms = torch.zeros(len(NETWORKS), device=device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.terms += result.terms.stacked()
        self.norms += result.grad_norms.detach().float()
        self.steps += 1

    def to_tensors(self) -> dict[str, Tensor]:
        return {"window.terms": self.terms.cpu(), "window.norms": self.norms.cpu(),
                "window.steps": torch.tensor([self.steps])}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.terms.copy_(tensors["window.terms"])
        self.norms.copy_(tensors["window.norms"])
        self.steps = int(tensors["window.steps"].item())

    def record(self, accelerator: Accelerator, global_batch: int, reset: bool = True) -> dict[str, float]:
        """The window's means over its steps and all processes; then, if `reset`, the window starts afresh."""
        terms = accelerator.reduce(self.terms, reduction="mean") / self.steps
        norms = accelerator.reduce(self.norms, reduction="mean") / self.steps
        elapsed = time.perf_counter() - self.started
        record = {**dict(zip(LossTerms.names(), terms.tolist(), strict=True)),
                  **{f"grad_norm_{name}": value for name, value in zip(NETWORKS, norms.tolist(), strict=True)},
                  "images_per_s": self.steps * global_batch / elapsed, "step_time_s": elapsed / self.steps}
        if reset:
            self.terms.zero_()
            self.norms.zero_()
            self.steps, self.started = 0, time.perf_counter()
        return record


def log_line(record: dict[str, float | int]) -> str:
    return (f"step {record['step']:>7} | epoch {record['epoch']:>3} | enc {record['enc_loss']:.4f} "
            f"dec {record['dec_loss']:.4f} dis {record['dis_loss']:.4f} | D(x) {record['d_x']:.3f} "
            f"D(x̃) {record['d_x_tilde']:.3f} D(x_p) {record['d_x_p']:.3f} | "
            f"{record['images_per_s']:.0f} img/s")


def rng_tensors(device: torch.device) -> dict[str, Tensor]:
    """This process's RNG states: the global torch generators that draw the noise and the dropout masks."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def steps_to_run(config: TrainConfig, shards: ShardedBatches, position: Position) -> int:
    """Global steps from `position` to the end of the run (the last epoch, or max_steps)."""
    left = shards.steps_per_epoch(position.images_seen) + (config.epochs - position.epoch - 1) * \
        shards.steps_per_epoch()
    if position.epoch >= config.epochs:
        left = 0
    if config.max_steps is not None:
        left = min(left, config.max_steps - position.step)
    return max(left, 0)


def configure_cpu_threads(config: TrainConfig) -> None:
    """On the CPU, give each process its share of the cores unless --cpu-threads says otherwise."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(config.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local_processes))


def train(config: TrainConfig, accelerator: Accelerator) -> int:
    """Trains until the run's end (returns 0) or a stop signal (saves, returns EXIT_PREEMPTED)."""
    output_dir = Path(config.output_dir)
    resume_from = resolve_resume(config.resume, output_dir, accelerator.print)
    if len(choices := set(gather_object([str(resume_from)]))) > 1:
        raise CheckpointError(f"the processes found different checkpoints to resume from ({sorted(choices)}): "
                              "put --output-dir on a file system that every machine shares")
    checkpoint = Checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        for key, old, new in config_changes(checkpoint.config, config):
            accelerator.print(f"resume: overriding {key} = {old!r} from the checkpoint with {new!r}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if config.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.print("warning: fp16 needs a GPU; Accelerate runs fp32 here. Use --mixed-precision bf16.")
    if accelerator.device.type == "cpu":
        configure_cpu_threads(config)
        keep_freed_memory()

    set_seed(config.seed)  # the same initial weights on every process (DDP broadcasts rank 0's as well)
    networks = build_models(config)
    if config.compile:
        compile_networks(networks)
    optimizers = adam_optimizers(networks, config)
    prepared = accelerator.prepare(*networks, *optimizers)
    networks, optimizers = prepared[:3], prepared[3:]
    # The step drives the plain optimizers itself; see train_step for why.
    plain_optimizers = [opt.optimizer for opt in optimizers]
    named_networks = dict(zip(NETWORKS, (accelerator.unwrap_model(net) for net in networks), strict=True))
    named_optimizers = dict(zip(NETWORKS, plain_optimizers, strict=True))
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

    position, skipped_steps, window = Position(), 0, MetricWindow(accelerator.device)
    if checkpoint is not None:
        state = checkpoint.state
        for name, module in named_networks.items():
            module.load_state_dict(checkpoint.network(name))
        load_optimizer_tensors(named_optimizers, checkpoint.optimizers())
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        position, skipped_steps = Position(**state["position"]), state["skipped_steps"]
        if state["world_size"] == accelerator.num_processes:
            rank_tensors = checkpoint.rank_tensors(accelerator.process_index)
            restore_rng(rank_tensors, accelerator.device)
            window.load_tensors(rank_tensors)
        else:  # elastic: the data position carries over exactly; the noise streams start anew
            accelerator.print(f"resume: the checkpoint was written by {state['world_size']} processes, this run "
                              f"has {accelerator.num_processes}: the epoch continues with its unseen images, "
                              "and each process's noise is reseeded")
            torch.manual_seed(hash((config.seed, position.step, accelerator.process_index)) & 0xFFFF_FFFF)
        accelerator.print(f"resume: from {checkpoint.path} (step {position.step}, epoch {position.epoch}, "
                          f"{position.images_seen} images into it)")

    steps_per_epoch = shards.steps_per_epoch()
    remaining = steps_to_run(config, shards, position)
    accelerator.print(f"vaegan-dist: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
                      f"mixed precision {accelerator.mixed_precision}, batch {batch_size} per process "
                      f"({shards.global_batch} global), {steps_per_epoch} steps per epoch, {remaining} steps "
                      f"to run from step {position.step}, outputs in {output_dir}")

    def save(at: Position) -> Path:
        state = {"seed": config.seed, "skipped_steps": skipped_steps, "wandb_run_id": None,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        path = save_checkpoint(accelerator, output_dir, config, at, named_networks, named_optimizers, state,
                               {**rng_tensors(accelerator.device), **window.to_tensors()})
        accelerator.print(f"checkpoint: {path}")
        return path

    def save_pictures(tag: str) -> None:
        if accelerator.is_main_process:
            save_epoch_grids(named_networks["encoder"], named_networks["decoder"], fixed_z, test_x, output_dir, tag)

    metrics = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process)
    watch = PreemptionWatch()
    last_step = position.step + remaining
    step, epoch, images_seen = position.step, position.epoch, position.images_seen
    while step < last_step:
        for batch in shards.batches(epoch, images_seen):
            result = train_step(networks, plain_optimizers, images_to_pixels(batch), config, accelerator.scaler,
                                accelerator.autocast)
            step, images_seen = step + 1, images_seen + shards.global_batch
            skipped_steps += not result.stepped
            window.add(result)
            if step % config.log_every == 0 or step == last_step:
                # A run's last record off the log_every grid keeps its window open: the checkpoint carries it,
                # so a resumed run logs exactly what an uninterrupted run would have.
                record = {"step": step, "epoch": epoch, "skipped_steps": skipped_steps,
                          **window.record(accelerator, shards.global_batch, reset=step % config.log_every == 0)}
                metrics.write(record)
                accelerator.print(log_line(record))
            if stop_signal := watch.requested(accelerator):
                save(Position(step, epoch, images_seen))
                accelerator.print(f"stopped by {stop_signal.name} at step {step}: exit code {EXIT_PREEMPTED}; "
                                  "run the same command again to resume")
                if config.requeue and accelerator.is_main_process:
                    accelerator.print(requeue_slurm_job())
                return EXIT_PREEMPTED
            if step == last_step:
                break
            if step % config.save_every == 0:
                save(Position(step, epoch, images_seen))
        else:  # the epoch ran to its end
            save_pictures(f"epoch_{epoch + 1:03d}")
            epoch, images_seen = epoch + 1, 0
            continue
        break
    if remaining:
        if shards.steps_per_epoch(images_seen) == 0:  # the last step finished an epoch
            save_pictures(f"epoch_{epoch + 1:03d}")
            epoch, images_seen = epoch + 1, 0
        else:
            save_pictures(f"step_{step:07d}")
        save(Position(step, epoch, images_seen))
    accelerator.print(f"done: {step} steps, {skipped_steps} skipped; outputs in {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> None:
    exit_code = 0
    try:
        config = parse_args(argv)
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        exit_code = train(dataclasses.replace(config, mixed_precision=accelerator.mixed_precision), accelerator)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        exit_code = EXIT_BAD_INPUT
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_code = EXIT_CHECKPOINT_FAILED
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
