"""The training loop and the command line: `accelerate launch train.py`, `python -m vaegan_dist.train` or
`vaegan-train`, all with the same flags (`--help` lists them).

`train` reads as the run goes: open the run (its output directory and the checkpoint it resumes), build the
networks, load the data, restore the checkpoint's state, announce the run; then the loop, whose every step is

    lr → step → log → W&B grids → stop? → evaluate → epoch pictures → checkpoint

and the end that the loop's outcome (finished, diverged, preempted) calls for, whose value is the exit code.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, gather_object, set_seed
from torch import Tensor

from vaegan_dist.checkpoint import (
    Checkpoint,
    CheckpointError,
    Position,
    TrainState,
    config_changes,
    load_optimizer_tensors,
    resolve_resume,
    save_checkpoint,
)
from vaegan_dist.config import ConfigError, TrainConfig, parse_args
from vaegan_dist.console import Console, describe_processes
from vaegan_dist.cpu import configure_cpu, cpu_flags, emulates_bf16
from vaegan_dist.cuda_graphs import GraphedStep, check_launch_free
from vaegan_dist.data import DataError, ShardedBatches, derived_seed, load_mnist
from vaegan_dist.evaluation import Reference, evaluate_distributed, evaluation_line
from vaegan_dist.exits import EXIT_BAD_INPUT, EXIT_CHECKPOINT_FAILED, Ending, fail, leave
from vaegan_dist.launch_settings import is_main_launch_process, unsupported_launch_setting
from vaegan_dist.models import (
    Autoencoder,
    Networks,
    build_models,
    compile_networks,
    images_to_pixels,
    moving_averages,
    update_averages,
)
from vaegan_dist.pictures import grid_image, grid_pixels, save_epoch_grids
from vaegan_dist.preemption import PreemptionWatch, requeue_slurm_job
from vaegan_dist.report import ReportError, write_report
from vaegan_dist.run_lock import LockHeld, OutputLock
from vaegan_dist.step import StepResult, adam_optimizers, learning_rate, train_step
from vaegan_dist.tracking import Trackers
from vaegan_dist.training_log import CollapseWatch, MetricsLog, MetricWindow, peak_memory_mb

NUM_FIXED_SAMPLES = 64
NUM_RECONSTRUCTED = 32


@dataclass
class Run:
    """What stays fixed while the loop runs: the settings, the networks, the data and where results go."""

    config: TrainConfig
    accelerator: Accelerator
    console: Console
    output_dir: Path
    checkpoint: Checkpoint | None  # the one this run resumes, if any
    networks: Networks  # as accelerator.prepare returned them (DDP-wrapped on several processes): the step's
    modules: Networks  # the same networks unwrapped: checkpoints, pictures, evaluations
    optimizers: Networks  # plain torch optimizers, which the step drives itself (see train_step)
    averages: Autoencoder | None  # the encoder's and the decoder's moving averages (--ema-decay)
    shards: ShardedBatches
    fixed_z: Tensor  # the latent codes of every sample grid
    test_x: Tensor  # the test digits of every reconstruction grid
    reference: Reference | None  # the evaluation's classifier and test features (None: evaluation off)
    tracker: Trackers  # --tracker: W&B, TensorBoard, both or none
    metrics: MetricsLog
    last_step: int
    graphed_step: GraphedStep | None = None  # --cuda-graphs: the step captured in a CUDA graph

    @property
    def autoencoder(self) -> Autoencoder:
        """The pair that pictures and evaluations use: the moving averages where the run keeps them."""
        return self.averages if self.averages is not None else Autoencoder(self.modules.encoder, self.modules.decoder)


# ---------------------------------------------------------------------------------------------- setting up

@contextmanager
def output_dir_held(config: TrainConfig, accelerator: Accelerator) -> Iterator[None]:
    """The output directory, created and held against other runs (by the main process) for the block."""
    lock, problem = OutputLock(Path(config.output_dir)), None
    if accelerator.is_main_process:
        try:
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except LockHeld as err:
            problem = str(err)
        except OSError as err:
            problem = (f"cannot write to output directory {lock.path.parent} ({err.strerror}): choose a writable "
                       "--output-dir")
    if problem := gather_object([problem])[0]:  # the main process's verdict, on every process
        raise ConfigError(problem)
    try:
        yield
    finally:
        lock.release()


def open_run(config: TrainConfig, accelerator: Accelerator, console: Console) -> tuple[Path, Checkpoint | None]:
    """The output directory, holding the run's config.json, and the checkpoint to resume (None: a fresh start)."""
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
    if config.mixed_precision == "bf16" and accelerator.device.type == "cpu" and emulates_bf16(cpu_flags()):
        console.warn("this CPU has no bf16 instructions (AVX512_BF16, AMX or Arm's BF16): torch emulates bf16, "
                     "which is slower than fp32 here (2× to 50× as measured); use --mixed-precision no")
    if config.gradient_allreduce != "fp32" and accelerator.num_processes == 1:
        console.warn(f"--gradient-allreduce {config.gradient_allreduce} has no effect in one process: there is "
                     "nothing to average")
    return output_dir, checkpoint


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator: its mixed precision, and DDP averaging gradients in --gradient-allreduce's precision
    (torch's bf16_compress_hook: each process's gradient cast to bf16 and divided, summed in bf16, cast back)."""
    hook = {"fp32": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16}[config.gradient_allreduce]
    return Accelerator(mixed_precision=config.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(comm_hook=hook)])


def build_networks(config: TrainConfig, accelerator: Accelerator) -> tuple[Networks, Networks, Networks]:
    """(the prepared networks, the same unwrapped, their plain optimizers), initialised alike on every process."""
    set_seed(config.seed)  # the same initial weights on every process (DDP broadcasts rank 0's as well)
    networks = build_models(config)
    if config.compile:
        compile_networks(networks)
    prepared = accelerator.prepare(*networks, *adam_optimizers(networks, config))
    set_seed(config.seed, device_specific=True)  # each process draws its own dropout masks and noise
    return (Networks(*prepared[:3]), Networks(*(accelerator.unwrap_model(net) for net in prepared[:3])),
            Networks(*(optimizer.optimizer for optimizer in prepared[3:])))


def load_data(config: TrainConfig, accelerator: Accelerator) -> tuple[ShardedBatches, Tensor, Tensor]:
    """This process's shard of the training set on its device, and the fixed codes and test digits of the
    picture grids."""
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
    return shards, fixed_z, images_to_pixels(test_images[:NUM_RECONSTRUCTED]).to(accelerator.device)


def evaluation_reference(config: TrainConfig, device: torch.device, console: Console) -> Reference | None:
    if not config.eval_samples:
        return None
    try:
        return Reference(device)
    except (OSError, RuntimeError, DataError) as err:  # evaluating is never worth losing the training run
        console.warn(f"evaluation is off for this run: {err}")
        return None


def steps_to_run(config: TrainConfig, shards: ShardedBatches, position: Position) -> int:
    """Global steps from `position` to the end of the run (the last epoch, or max_steps)."""
    left = shards.steps_per_epoch(position.images_seen) + (config.epochs - position.epoch - 1) * \
        shards.steps_per_epoch()
    if position.epoch >= config.epochs:
        left = 0
    if config.max_steps is not None:
        left = min(left, config.max_steps - position.step)
    return max(left, 0)


def restore(run: Run) -> TrainState:
    """The state to start from: the checkpoint's, loaded into the networks and optimizers, or a fresh one."""
    window = MetricWindow(run.accelerator.device)
    if run.checkpoint is None:
        return TrainState(Position(), window)
    checkpoint, accelerator = run.checkpoint, run.accelerator
    checkpoint.load_networks(run.modules, run.averages)
    load_optimizer_tensors(run.optimizers, checkpoint.optimizers())
    same_processes = checkpoint.state["world_size"] == accelerator.num_processes
    state = TrainState.from_checkpoint(checkpoint, accelerator.scaler, window,
                                       accelerator.process_index if same_processes else None)
    if not same_processes:  # the data position carries over exactly; the noise streams start anew
        run.console.info(f"resume: the checkpoint was written by {checkpoint.state['world_size']} processes, this "
                         f"run has {accelerator.num_processes}: the epoch continues with its unseen images, and "
                         "each process's noise is reseeded")
        torch.manual_seed(derived_seed(run.config.seed, state.position.step, accelerator.process_index))
    position = state.position
    run.console.info(f"resume: from {checkpoint.path} (step {position.step}, epoch {position.epoch}, "
                     f"{position.images_seen} images into it)")
    return state


def start(config: TrainConfig, accelerator: Accelerator, console: Console) -> tuple[Run, TrainState]:
    """Everything the loop needs, restored from the checkpoint when the run resumes one."""
    output_dir, checkpoint = open_run(config, accelerator, console)
    networks, modules, optimizers = build_networks(config, accelerator)
    shards, fixed_z, test_x = load_data(config, accelerator)
    run = Run(config, accelerator, console, output_dir, checkpoint, networks, modules, optimizers,
              moving_averages(config, modules) if config.ema_decay else None, shards, fixed_z, test_x,
              evaluation_reference(config, accelerator.device, console), Trackers(config.tracker, console.warn),
              MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process, console.warn), last_step=0)
    state = restore(run)
    run.metrics.resume_at(state.position.step)  # what a crashed run logged past its checkpoint goes
    run.last_step = state.position.step + steps_to_run(config, shards, state.position)
    run.graphed_step = GraphedStep() if config.cuda_graphs else None
    return run, state


def announce(run: Run, state: TrainState) -> None:
    """Starts the W&B run (one per job: a resumed job continues the checkpoint's) and shows the run's table."""
    config, accelerator, shards, position = run.config, run.accelerator, run.shards, state.position
    if accelerator.is_main_process:
        run.tracker.start(config.wandb, {**config.to_dict(), "num_processes": accelerator.num_processes},
                          run.output_dir, run_id=state.wandb_run_id, timeout=config.wandb_timeout)
        state.wandb_run_id = run.tracker.run_id
    run.console.table("vaegan-dist", {
        "processes": describe_processes(accelerator),
        "mixed precision": accelerator.mixed_precision,
        "batch": f"{shards.batch_size} per process, {shards.global_batch} global",
        "data": f"{shards.images.shape[0]} training images, {shards.steps_per_epoch() * shards.batch_size} per "
                "process per epoch",
        "steps": f"{shards.steps_per_epoch()} per epoch, {run.last_step - position.step} to run from step "
                 f"{position.step}",
        "outputs": str(run.output_dir),
        "resume from": f"{run.checkpoint.path} (step {position.step})" if run.checkpoint else "none (fresh start)",
        f"W&B ({run.tracker.mode})": run.tracker.location,
    })
    if run.tracker.active and run.tracker.mode == "offline":
        run.console.info(f"upload the W&B run later with: wandb sync {run.tracker.location}")


# ---------------------------------------------------------------------------------------------- one step and
# the periodic actions around it

def batches_from(shards: ShardedBatches, start: Position, last_step: int) -> Iterator[tuple[Tensor, int, Position]]:
    """Each batch from `start` to the run's last step, with its epoch and the position after it: an epoch's
    last batch leads to the next epoch's start."""
    step, epoch, images_seen = start.step, start.epoch, start.images_seen
    while step < last_step:
        for batch in shards.batches(epoch, images_seen):
            step, images_seen = step + 1, images_seen + shards.global_batch
            epoch_ended = shards.steps_per_epoch(images_seen) == 0
            yield batch, epoch, Position(step, epoch + 1, 0) if epoch_ended else Position(step, epoch, images_seen)
            if step == last_step:
                return
        epoch, images_seen = epoch + 1, 0


def step_networks(run: Run, batch: Tensor, step: int, bounds: Networks | None) -> StepResult:
    """Step `step` (counting from 0) of all three networks at the scheduled learning rate, then the average.
    `bounds`: the previous step's result.bounds (see train_step; the captured step has none)."""
    lr = learning_rate(run.config, step, run.last_step)
    for name, optimizer in run.optimizers._asdict().items():
        optimizer.param_groups[0]["lr"] = lr * run.config.network_lr_scale(name)
    step_fn = run.graphed_step or partial(train_step, bounds=bounds)
    result = step_fn(run.networks, run.optimizers, images_to_pixels(batch), run.config, run.accelerator.scaler)
    if run.averages is not None and result.stepped:
        update_averages(run.averages, run.modules, run.config.ema_decay, step + 1)
    return result


def due(run: Run, step: int, every: int | None) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps (never when None), and at the last."""
    return step == run.last_step or (every is not None and step % every == 0)


def log_record(run: Run, state: TrainState, epoch: int, collapse: CollapseWatch) -> None:
    """One record of the window's means to metrics.jsonl, W&B and the console."""
    step = state.position.step
    # A run's last record off the log_every grid keeps its window open: the checkpoint carries it, so a
    # resumed run logs exactly what an uninterrupted run would have.
    record = {"step": step, "epoch": epoch, "skipped_steps": state.skipped_steps,
              **state.window.record(run.accelerator, run.shards.global_batch, reset=step % run.config.log_every == 0),
              **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in run.optimizers._asdict().items()},
              "peak_memory_mb": peak_memory_mb(run.accelerator.device)}
    run.metrics.write(record)
    run.tracker.log(record)
    run.console.show(record)
    if warning := collapse.warning(record):
        run.console.warn(warning)


def send_grids(run: Run, step: int) -> None:
    """The sample and reconstruction grids to W&B."""
    pixels = grid_pixels(*run.autoencoder, run.fixed_z, run.test_x)
    run.tracker.log({"step": step, **{name: np.asarray(grid_image(p)) for name, p in pixels.items()}})


def evaluate(run: Run, state: TrainState, epoch: int) -> None:
    """The sample-quality evaluation, logged like a record; a failure costs a warning, never the run."""
    started, step = time.perf_counter(), state.position.step
    try:
        scores = evaluate_distributed(run.accelerator, *run.autoencoder, run.config,
                                      run.config.eval_samples, run.reference)
    except Exception as err:
        run.console.warn(f"the evaluation at step {step} failed ({type(err).__name__}: {err}); training continues")
    else:
        if run.accelerator.is_main_process:
            evaluation = {"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in scores.items()}}
            run.metrics.write(evaluation)
            run.tracker.log(evaluation)
            run.console.info(evaluation_line(step, scores))
    state.window.started += time.perf_counter() - started  # not training time


def save_pictures(run: Run, tag: str) -> None:
    if run.accelerator.is_main_process:
        save_epoch_grids(*run.autoencoder, run.fixed_z, run.test_x, run.output_dir, tag)


def save(run: Run, state: TrainState) -> Path:
    path = save_checkpoint(run.accelerator, run.output_dir, run.config, run.modules, run.optimizers, state,
                           run.averages)
    run.console.info(f"checkpoint: {path}")
    return path


def save_periodically(run: Run, state: TrainState) -> None:
    try:
        save(run, state)
    except CheckpointError as err:
        if run.config.on_save_error == "stop":
            raise
        run.console.warn(f"{err}. Training continues (--on-save-error continue); the previous checkpoint is kept "
                         "and the next save tries again.")


# ---------------------------------------------------------------------------------------------- the loop

@dataclass
class SkipStreak:
    """The steps skipped in a row (on every process alike), counted by their StepResult.skip_reason."""

    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, result: StepResult) -> int:
        """Counts the step (one that stepped ends the streak); the steps skipped in a row now."""
        if result.stepped:
            self.reasons.clear()
        else:
            self.reasons[result.skip_reason or "unknown"] += 1
        return self.reasons.total()

    def describe(self) -> str:
        return ", ".join(f"{count} for {reason}" for reason, count in self.reasons.most_common())


def train_loop(run: Run, state: TrainState, watch: PreemptionWatch, skips: SkipStreak) -> Ending:
    """Steps to the run's last step (FINISHED), or until a stop signal (PREEMPTED; INTERRUPTED for Ctrl-C) or
    max_consecutive_skips skipped steps in a row (DIVERGED; `skips` says why they were skipped)."""
    # The update guard's bounds go from step to step here, not in the checkpoint's TrainState: a resumed run, whose
    # weights and moments were loaded, starts without and measures them. Nothing else in the loop writes either.
    config, collapse, bounds = run.config, CollapseWatch(), None
    run.console.start_progress(run.last_step, state.position.step,
                               epochs=-(-run.last_step // run.shards.steps_per_epoch()))
    for batch, epoch, position in batches_from(run.shards, state.position, run.last_step):
        result = step_networks(run, batch, state.position.step, bounds)
        bounds = result.bounds
        state.position, state.skipped_steps = position, state.skipped_steps + (not result.stepped)
        state.window.add(result)
        consecutive_skips = skips.add(result)
        step = position.step
        if due(run, step, config.log_every):
            log_record(run, state, epoch, collapse)
        if run.tracker.active and due(run, step, config.image_every):
            send_grids(run, step)
        run.console.advance(step, epoch)
        if consecutive_skips == config.max_consecutive_skips:
            return Ending.DIVERGED
        if stop_signal := watch.requested(run.accelerator):
            ending = Ending.INTERRUPTED if stop_signal == signal.SIGINT else Ending.PREEMPTED
            run.console.info(f"stopped by {stop_signal.name} at step {step}: exit code {ending.value}; run the same "
                             "command again to resume")
            return ending
        if run.reference is not None and due(run, step, config.eval_every):
            evaluate(run, state, epoch)
        if position.epoch > epoch:
            save_pictures(run, f"epoch_{epoch + 1:03d}")
        if step % config.save_every == 0 and step != run.last_step:
            save_periodically(run, state)
    return Ending.FINISHED


# ---------------------------------------------------------------------------------------------- the end

def finish(run: Run, state: TrainState, ending: Ending, ran: bool, skips: SkipStreak) -> Ending:
    """Saves what the ending calls for (nothing when no step ran), tells the user, and returns the ending."""
    console, position = run.console, state.position
    if ending is Ending.FINISHED and ran and position.images_seen:  # a mid-epoch end gets pictures of its own
        save_pictures(run, f"step_{position.step:07d}")
    path = save(run, state) if ran or ending is not Ending.FINISHED else None
    console.stop_progress()
    if ending is Ending.FINISHED and run.accelerator.is_main_process:
        try:
            write_report(run.output_dir)
        except ReportError as err:
            console.info(f"report: {err}")
    run.tracker.finish(ending)
    if ending is Ending.DIVERGED:
        console.error(f"the run diverged: {run.config.max_consecutive_skips} steps in a row were skipped "
                      f"({skips.describe()}); each left the weights and Adam's moments as they were. {path} holds "
                      "the last good weights; resume from it with a lower --lr (or --gamma), or start over.")
    elif ending is Ending.PREEMPTED and run.config.requeue and run.accelerator.is_main_process:
        console.info(requeue_slurm_job())
    elif ending is Ending.FINISHED:
        console.info(f"done: {position.step} steps, {state.skipped_steps} skipped; outputs in {run.output_dir}")
    return ending


def train(config: TrainConfig, accelerator: Accelerator, console: Console | None = None) -> Ending:
    """Trains to the run's end, a stop signal (saves first) or divergence (saves the last good weights).
    `console` shows the run (by default, a new one for this process)."""
    check_launch_free(config, accelerator)
    if accelerator.device.type == "cpu":
        configure_cpu(config.cpu_threads)
    console = console or Console(accelerator.is_main_process, accelerator.process_index)
    with output_dir_held(config, accelerator):
        run, state = start(config, accelerator, console)
        announce(run, state)
        first_step = state.position.step
        with PreemptionWatch(console.info) as watch:  # kept through the last save: a late signal waits for it
            skips = SkipStreak()
            ending = train_loop(run, state, watch, skips)
            return finish(run, state, ending, ran=state.position.step > first_step, skips=skips)


def main(argv: list[str] | None = None) -> None:
    if problem := unsupported_launch_setting():  # before Accelerator() acts on it; said once, by the first process
        if is_main_launch_process():
            fail(problem, EXIT_BAD_INPUT)
        sys.exit(EXIT_BAD_INPUT)
    try:
        config = parse_args(argv)
        accelerator = make_accelerator(config)
        with Console(accelerator.is_main_process, accelerator.process_index) as console:
            ending = train(dataclasses.replace(config, mixed_precision=accelerator.mixed_precision), accelerator,
                           console)
        # All processes leave together: the main process may still be finishing W&B and the report, and a peer
        # tearing down its gloo connections meanwhile could abort it.
        accelerator.wait_for_everyone()
        leave(ending)
    except (ConfigError, DataError) as err:
        fail(str(err), EXIT_BAD_INPUT)
    except CheckpointError as err:
        fail(str(err), EXIT_CHECKPOINT_FAILED)
    except KeyboardInterrupt:  # a second Ctrl-C
        fail("stopped by a second Ctrl-C: nothing was saved since the last checkpoint", Ending.INTERRUPTED)
    finally:  # with a process group here, leave() did not run: an unexpected error, whose traceback follows
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
