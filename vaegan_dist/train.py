"""The training loop and the command line: `accelerate launch train.py`, `python -m vaegan_dist.train` or
`vaegan-train`, all with the same flags (`--help` lists them)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor

from vaegan_dist.checkpoint import (
    EMA_FILE,
    Checkpoint,
    CheckpointError,
    Position,
    config_changes,
    load_optimizer_tensors,
    resolve_resume,
    save_checkpoint,
)
from vaegan_dist.config import EXIT_BAD_INPUT, ConfigError, TrainConfig, parse_args
from vaegan_dist.console import Console, describe_processes
from vaegan_dist.cpu import configure_cpu
from vaegan_dist.data import DataError, ShardedBatches, load_mnist
from vaegan_dist.evaluation import Reference, evaluate_distributed, evaluation_line
from vaegan_dist.losses import LossTerms
from vaegan_dist.models import averaged_decoder, build_models, compile_networks, images_to_pixels, update_average
from vaegan_dist.pictures import grid_image, grid_pixels, save_epoch_grids
from vaegan_dist.preemption import PreemptionWatch, requeue_slurm_job
from vaegan_dist.report import ReportError, write_report
from vaegan_dist.step import NETWORKS, StepResult, adam_optimizers, learning_rate, train_step
from vaegan_dist.tracking import Tracker, peak_memory_mb

NUM_FIXED_SAMPLES = 64
NUM_RECONSTRUCTED = 32
EXIT_CHECKPOINT_FAILED = 3
EXIT_DIVERGED = 4  # max_consecutive_skips non-finite steps in a row; the last good weights are checkpointed
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint; run again to resume
# A discriminator whose mean outputs on real and reconstructed images both sit within COLLAPSE_MARGIN of 0 or 1
# for COLLAPSE_RECORDS logged records in a row has stopped giving the other networks a useful signal.
COLLAPSE_MARGIN = 0.01
COLLAPSE_RECORDS = 10


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


def discriminator_collapsed(record: dict[str, float]) -> bool:
    """Whether D(x) and D(x̃) both sit at 0 or 1: D wins outright, or has given up."""
    return all(min(record[key], 1 - record[key]) < COLLAPSE_MARGIN for key in ("d_x", "d_x_tilde"))


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


def train(config: TrainConfig, accelerator: Accelerator, console: Console | None = None) -> int:
    """Trains to the run's end (returns 0), a stop signal (saves, returns EXIT_PREEMPTED) or divergence
    (saves, returns EXIT_DIVERGED). `console` shows the run (by default, a new one for this process)."""
    if accelerator.device.type == "cpu":
        configure_cpu(config.cpu_threads)
    console = console or Console(accelerator.is_main_process, accelerator.process_index)
    output_dir = Path(config.output_dir)
    resume_from = resolve_resume(config.resume, output_dir, console.warn)
    if len(choices := set(gather_object([str(resume_from)]))) > 1:
        raise CheckpointError(f"the processes found different checkpoints to resume from ({sorted(choices)}): "
                              "put --output-dir on a file system that every machine shares")
    checkpoint = Checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        for key, old, new in config_changes(checkpoint.config, config):
            console.info(f"resume: overriding {key} = {old!r} from the checkpoint with {new!r}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:
            (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write to output directory {output_dir} ({err.strerror}): choose a writable "
                          "--output-dir") from None
    if config.mixed_precision == "fp16" and accelerator.scaler is None:
        console.warn("fp16 needs a GPU; Accelerate runs fp32 here. Use --mixed-precision bf16.")

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
            console.info(f"resume: the checkpoint was written by {state['world_size']} processes, this run "
                         f"has {accelerator.num_processes}: the epoch continues with its unseen images, "
                         "and each process's noise is reseeded")
            torch.manual_seed(hash((config.seed, position.step, accelerator.process_index)) & 0xFFFF_FFFF)
        console.info(f"resume: from {checkpoint.path} (step {position.step}, epoch {position.epoch}, "
                     f"{position.images_seen} images into it)")
    if config.ema_decay:  # from the decoder as it is now: initial, or the checkpoint's when it has no average
        named_networks[EMA_FILE] = averaged_decoder(config, named_networks["decoder"])
        if checkpoint is not None and checkpoint.has_network(EMA_FILE):
            named_networks[EMA_FILE].load_state_dict(checkpoint.network(EMA_FILE))
    sampler = named_networks.get(EMA_FILE, named_networks["decoder"])  # the decoder that pictures and evaluations use
    reference = None
    if config.eval_samples:
        try:
            reference = Reference(accelerator.device)
        except (OSError, RuntimeError, DataError) as err:  # evaluating is never worth losing the training run
            console.warn(f"evaluation is off for this run: {err}")

    steps_per_epoch = shards.steps_per_epoch()
    remaining = steps_to_run(config, shards, position)
    tracker = Tracker(console.warn)
    if accelerator.is_main_process:  # one W&B run per job; a resumed job continues the checkpoint's run
        tracker.start(config.wandb, {**config.to_dict(), "num_processes": accelerator.num_processes}, output_dir,
                      run_id=checkpoint.state.get("wandb_run_id") if checkpoint else None,
                      timeout=config.wandb_timeout)
    console.table("vaegan-dist", {
        "processes": describe_processes(accelerator),
        "mixed precision": accelerator.mixed_precision,
        "batch": f"{batch_size} per process, {shards.global_batch} global",
        "data": f"{train_images.shape[0]} training images, {steps_per_epoch * batch_size} per process per epoch",
        "steps": f"{steps_per_epoch} per epoch, {remaining} to run from step {position.step}",
        "outputs": str(output_dir),
        "resume from": f"{checkpoint.path} (step {position.step})" if checkpoint else "none (fresh start)",
        f"W&B ({tracker.mode})": tracker.location,
    })
    if tracker.active and tracker.mode == "offline":
        console.info(f"upload the W&B run later with: wandb sync {tracker.location}")

    def save(at: Position) -> Path:
        state = {"seed": config.seed, "skipped_steps": skipped_steps, "wandb_run_id": tracker.run_id,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        path = save_checkpoint(accelerator, output_dir, config, at, named_networks, named_optimizers, state,
                               {**rng_tensors(accelerator.device), **window.to_tensors()})
        console.info(f"checkpoint: {path}")
        return path

    def stop_showing(exit_code: int) -> None:
        console.stop_progress()
        tracker.finish(exit_code)

    def save_pictures(tag: str) -> None:
        if accelerator.is_main_process:
            save_epoch_grids(named_networks["encoder"], sampler, fixed_z, test_x, output_dir, tag)

    metrics = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process)
    watch = PreemptionWatch()
    consecutive_skips, collapsed_records = 0, 0
    last_step = position.step + remaining
    step, epoch, images_seen = position.step, position.epoch, position.images_seen
    console.start_progress(last_step, step, epochs=-(-last_step // steps_per_epoch))
    while step < last_step:
        for batch in shards.batches(epoch, images_seen):
            lr = learning_rate(config, step, last_step)
            for name, optimizer in named_optimizers.items():
                optimizer.param_groups[0]["lr"] = lr * config.network_lr_scale(name)
            result = train_step(networks, plain_optimizers, images_to_pixels(batch), config, accelerator.scaler)
            step, images_seen = step + 1, images_seen + shards.global_batch
            if config.ema_decay and result.stepped:
                update_average(sampler, named_networks["decoder"], config.ema_decay, step)
            skipped_steps += not result.stepped
            consecutive_skips = 0 if result.stepped else consecutive_skips + 1
            window.add(result)
            if step % config.log_every == 0 or step == last_step:
                # A run's last record off the log_every grid keeps its window open: the checkpoint carries it,
                # so a resumed run logs exactly what an uninterrupted run would have.
                record = {"step": step, "epoch": epoch, "skipped_steps": skipped_steps,
                          **window.record(accelerator, shards.global_batch, reset=step % config.log_every == 0),
                          **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in named_optimizers.items()},
                          "peak_memory_mb": peak_memory_mb(accelerator.device)}
                metrics.write(record)
                tracker.log(record)
                console.show(record)
                collapsed_records = collapsed_records + 1 if discriminator_collapsed(record) else 0
                if collapsed_records == COLLAPSE_RECORDS:
                    console.warn(f"the discriminator has collapsed: D(x) = {record['d_x']:.4f} and D(x̃) = "
                                 f"{record['d_x_tilde']:.4f} for {COLLAPSE_RECORDS} records in a row. Lower --lr, "
                                 "or resume an earlier checkpoint with other settings.")
            if tracker.active and (step % config.image_every == 0 or step == last_step):
                pixels = grid_pixels(named_networks["encoder"], sampler, fixed_z, test_x)
                tracker.log({"step": step, **{name: np.asarray(grid_image(p)) for name, p in pixels.items()}})
            console.advance(step, epoch)
            if consecutive_skips == config.max_consecutive_skips:
                path = save(Position(step, epoch, images_seen))
                stop_showing(EXIT_DIVERGED)
                console.error(f"the run diverged: {consecutive_skips} steps in a row had non-finite losses or "
                              f"gradients and were skipped. {path} holds the last good weights; resume from it "
                              "with a lower --lr (or --gamma), or start over.")
                return EXIT_DIVERGED
            if stop_signal := watch.requested(accelerator):
                save(Position(step, epoch, images_seen))
                stop_showing(EXIT_PREEMPTED)
                console.info(f"stopped by {stop_signal.name} at step {step}: exit code {EXIT_PREEMPTED}; "
                             "run the same command again to resume")
                if config.requeue and accelerator.is_main_process:
                    console.info(requeue_slurm_job())
                return EXIT_PREEMPTED
            if reference is not None and (step == last_step or (config.eval_every and step % config.eval_every == 0)):
                evaluation_started = time.perf_counter()
                try:
                    scores = evaluate_distributed(accelerator, named_networks["encoder"], sampler, config,
                                                  config.eval_samples, reference)
                except Exception as err:  # one warning per failed evaluation; training goes on
                    console.warn(f"the evaluation at step {step} failed ({type(err).__name__}: {err}); training "
                                 "continues")
                else:
                    if accelerator.is_main_process:
                        evaluation = {"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in scores.items()}}
                        metrics.write(evaluation)
                        tracker.log(evaluation)
                        console.info(evaluation_line(step, scores))
                window.started += time.perf_counter() - evaluation_started  # not training time
            if step == last_step:
                break
            if step % config.save_every == 0:
                try:
                    save(Position(step, epoch, images_seen))
                except CheckpointError as err:
                    if config.on_save_error == "stop":
                        raise
                    console.warn(f"{err}. Training continues (--on-save-error continue); the previous checkpoint "
                                 "is kept and the next save tries again.")
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
    console.stop_progress()
    if accelerator.is_main_process:
        try:
            write_report(output_dir)
        except ReportError as err:
            console.info(f"report: {err}")
    tracker.finish()
    console.info(f"done: {step} steps, {skipped_steps} skipped; outputs in {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> None:
    exit_code = 0
    try:
        config = parse_args(argv)
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        with Console(accelerator.is_main_process, accelerator.process_index) as console:
            exit_code = train(dataclasses.replace(config, mixed_precision=accelerator.mixed_precision), accelerator,
                              console)
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
