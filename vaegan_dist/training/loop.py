"""The training loop. `train` reads as the run goes: set the run up (vaegan_dist.training.setup: its output
directory, the checkpoint it resumes, the networks, the data, the state restored) and announce it; then the loop,
whose every step is

    lr → step → log → W&B grids → evaluate (a stop signal cuts it short) → stop? → epoch pictures → checkpoint

and the end that the loop's outcome (finished, diverged, preempted) calls for, whose value is the exit code.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import Tensor

from vaegan_dist.checkpoint.layout import BEST, CheckpointError, checkpoints_dir
from vaegan_dist.checkpoint.writing import keep_last_good, link_checkpoint, save_checkpoint
from vaegan_dist.config import TrainConfig
from vaegan_dist.data.sharding import ShardedBatches
from vaegan_dist.evaluation.batches import EvaluationStopped
from vaegan_dist.evaluation.pictures import grid_image, grid_pixels, save_epoch_grids
from vaegan_dist.evaluation.reconstruction import evaluate_images, reconstruction_line
from vaegan_dist.evaluation.report import ReportError, write_report
from vaegan_dist.evaluation.scores import Reference, evaluate_distributed, evaluation_line
from vaegan_dist.exits import Ending
from vaegan_dist.model.networks import (
    images_to_pixels,
    update_averages,
)
from vaegan_dist.training.console import Console
from vaegan_dist.training.cpu import configure_cpu
from vaegan_dist.training.cuda_graphs import check_launch_free
from vaegan_dist.training.metrics import CollapseWatch, StallWatch, peak_memory_mb
from vaegan_dist.training.preemption import PreemptionWatch, requeue_slurm_job
from vaegan_dist.training.setup import Run, announce, output_dir_held, start
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import StepResult, learning_rate, train_step

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


def step_networks(run: Run, batch: Tensor, step: int) -> StepResult:
    """Step `step` (counting from 0) of all three networks at the scheduled learning rate, then the average."""
    lr = learning_rate(run.config, step, run.last_step)
    for name, optimizer in run.optimizers._asdict().items():
        optimizer.param_groups[0]["lr"] = lr * run.config.network_lr_scale(name)
    step_fn = run.graphed_step or train_step
    result = step_fn(run.networks, run.optimizers, images_to_pixels(batch), run.config, run.accelerator.scaler)
    if run.averages is not None and result.stepped:
        update_averages(run.averages, run.modules, run.config.ema_decay, step + 1)
    return result


def due(run: Run, step: int, every: int | None) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps (never when None), and at the last."""
    return step == run.last_step or (every is not None and step % every == 0)


def log_record(run: Run, state: TrainState, epoch: int, collapse: CollapseWatch) -> None:
    """One record of the window's means to metrics.jsonl, the trackers (as train/<key>, beside eval/<key>) and the
    console."""
    step = state.position.step
    # A run's last record off the log_every grid keeps its window open: the checkpoint carries it, so a
    # resumed run logs exactly what an uninterrupted run would have.
    record = {"step": step, "epoch": epoch, "skipped_steps": state.skipped_steps,
              **state.window.record(run.accelerator, run.shards.global_batch, reset=step % run.config.log_every == 0),
              **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in run.optimizers._asdict().items()},
              "peak_memory_mb": peak_memory_mb(run.accelerator.device)}
    run.metrics.write(record)
    run.tracker.log({"step": step, **{f"train/{key}": value for key, value in record.items() if key != "step"}})
    run.console.show(record)
    if warning := collapse.warning(record):
        run.console.warn(warning)


def send_grids(run: Run, step: int) -> None:
    """The sample and reconstruction grids to W&B."""
    pixels = grid_pixels(*run.autoencoder, run.fixed_z, run.test_x)
    shape = run.config.image_shape
    run.tracker.log({"step": step, **{name: np.asarray(grid_image(p, shape)) for name, p in pixels.items()}})


def share_running_statistics(run: Run) -> None:
    """Batch norm's running statistics as the main process has them, on every process. Each process updates its
    own from its own batches, and DDP hands the main process's out only at each network's next forward: a
    checkpoint (which checks that the replicas agree) and an evaluation (each process embeds its share) read them
    before that. Networks without buffers send nothing."""
    if run.accelerator.num_processes > 1:
        for module in (*run.modules, *(run.averages or ())):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, 0)


def evaluation_mark(run: Run, step: int) -> int:
    """How many evaluation points steps 1..step pass: one every eval_every steps, or every eval_every_images
    training images."""
    config = run.config
    if config.eval_every_images:
        return step * run.shards.global_batch // config.eval_every_images
    return step // config.eval_every if config.eval_every else 0


def evaluation_due(run: Run, step: int) -> bool:
    """Whether an evaluation runs after `step`: at each evaluation point, and at the last step."""
    return run.reference is not None and (step == run.last_step
                                          or evaluation_mark(run, step) > evaluation_mark(run, step - 1))


def evaluations_to_come(run: Run, step: int) -> int:
    """How many evaluations the steps after `step` to the run's last will run."""
    if run.reference is None:
        return 0
    last = evaluation_mark(run, run.last_step)
    return last - evaluation_mark(run, step) + (last == evaluation_mark(run, run.last_step - 1))


def note_if_best(run: Run, state: TrainState, scores: dict[str, float]) -> None:
    """--keep-best: an evaluation better than every earlier one (lower eval/fid on MNIST, eval/recon_mse else)
    becomes state.best, whose step's checkpoint `save` then links as checkpoints/best. The main process alone
    holds the scores: every process learns them from it."""
    if not run.config.keep_best:
        return
    key = "fid" if isinstance(run.reference, Reference) else "recon_mse"
    value = broadcast(torch.tensor([scores.get(key, math.inf)], dtype=torch.float64, device=run.accelerator.device))
    if math.isfinite(value.item()) and (state.best is None or value.item() < state.best["value"]):
        state.best = {"step": state.position.step, "value": value.item()}


def evaluate_now(run: Run, state: TrainState, epoch: int, watch: PreemptionWatch) -> None:
    """The sample-quality evaluation, logged like a record; a failure costs a warning, never the run. A stop
    signal ends it within a batch (the loop then stops with a checkpoint)."""
    started, step = time.perf_counter(), state.position.step
    run.console.begin_evaluation(f"evaluating at step {step}")
    share_running_statistics(run)
    scores: dict[str, float] = {}
    mnist, config = isinstance(run.reference, Reference), run.config

    def stop_requested() -> bool:  # a collective: every process asks before the same batch
        return watch.requested(run.accelerator) is not None

    try:
        if mnist:
            scores = evaluate_distributed(run.accelerator, *run.autoencoder, config, config.eval_samples,
                                          run.reference, stop_requested)
        else:
            scores = evaluate_images(run.accelerator, *run.autoencoder, run.reference, config.eval_samples,
                                     config.latent_dim, config.seed, stop_requested)
    except EvaluationStopped:
        run.console.info(f"the evaluation at step {step} was cut short by the stop signal (`vaegan-eval` scores "
                         "the checkpoint)")
    except Exception as err:
        run.console.warn(f"the evaluation at step {step} failed ({type(err).__name__}: {err}); training continues")
    else:
        if run.accelerator.is_main_process:
            evaluation = {"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in scores.items()}}
            run.metrics.write(evaluation)
            run.tracker.log(evaluation)
            run.console.info((evaluation_line if mnist else reconstruction_line)(step, scores))
    note_if_best(run, state, scores)
    run.console.end_evaluation()
    state.window.started += time.perf_counter() - started  # not training time


def save_pictures(run: Run, tag: str) -> None:
    if run.accelerator.is_main_process:
        save_epoch_grids(*run.autoencoder, run.fixed_z, run.test_x, run.config.image_shape, run.output_dir, tag)


def save(run: Run, state: TrainState) -> Path:
    share_running_statistics(run)
    path = save_checkpoint(run.accelerator, run.output_dir, run.config, run.modules, run.optimizers, state,
                           run.averages)
    run.console.info(f"checkpoint: {path}")
    if state.best is not None and state.best["step"] == state.step and run.accelerator.is_main_process:
        try:
            link_checkpoint(path, BEST)
            run.console.info(f"best so far: {path} ({state.best['value']:.5g})")
        except OSError as err:  # a file system without symbolic links
            run.console.warn(f"cannot link checkpoints/best to {path} ({err}); training goes on")
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

def train_loop(run: Run, state: TrainState, watch: PreemptionWatch, stall: StallWatch) -> Ending:
    """Steps to the run's last step (FINISHED), or until a stop signal (PREEMPTED; INTERRUPTED for Ctrl-C) or
    max_consecutive_skips skipped steps in a row (DIVERGED); `stall` hears of each step's end."""
    config, collapse, consecutive_skips = run.config, CollapseWatch(), 0
    run.console.start_progress(run.last_step, state.position.step,
                               epochs=-(-run.last_step // run.shards.steps_per_epoch()),
                               evaluations=evaluations_to_come(run, state.position.step))
    for batch, epoch, position in batches_from(run.shards, state.position, run.last_step):
        result = step_networks(run, batch, state.position.step)
        state.position, state.skipped_steps = position, state.skipped_steps + (not result.stepped)
        state.window.add(result)
        consecutive_skips = 0 if result.stepped else consecutive_skips + 1
        step = position.step
        if due(run, step, config.log_every):
            log_record(run, state, epoch, collapse)
        if run.tracker.active and due(run, step, config.image_every):
            send_grids(run, step)
        run.console.advance(step, epoch)
        if consecutive_skips == config.max_consecutive_skips:
            return Ending.DIVERGED
        if evaluation_due(run, step):
            evaluate_now(run, state, epoch, watch)
        if stop_signal := watch.requested(run.accelerator):
            ending = Ending.INTERRUPTED if stop_signal == signal.SIGINT else Ending.PREEMPTED
            run.console.info(f"stopped by {stop_signal.name} at step {step}: exit code {ending.value}; run the same "
                             "command again to resume")
            return ending
        if position.epoch > epoch:
            save_pictures(run, f"epoch_{epoch + 1:03d}")
        best_now = state.best is not None and state.best["step"] == step
        # no checkpoint while steps are skipped: it would hold weights that give non-finite losses
        if (step % config.save_every == 0 or best_now) and step != run.last_step and not consecutive_skips:
            save_periodically(run, state)
        stall.beat()
    return Ending.FINISHED


# ---------------------------------------------------------------------------------------------- the end

def closing_lines(run: Run, state: TrainState, ran_steps: int, elapsed: float, written: list[Path]) -> list[str]:
    """What a finished run says last: how long and how fast, the files it wrote, the commands that come next."""
    out = run.output_dir
    images_per_s = ran_steps * run.shards.global_batch / max(elapsed, 1e-9)
    pictures = len(list((out / "samples").glob("*.png")))
    files = [f"{written[0].relative_to(out)}/", "metrics.jsonl", "config.json",
             f"samples/ and reconstructions/ ({pictures} picture{'s' * (pictures != 1)} each)",
             *(p.name for p in written[1:])]
    lines = [f"done: {state.position.step} steps ({state.skipped_steps} skipped) in "
             f"{timedelta(seconds=round(elapsed))}, {images_per_s:,.0f} img/s; outputs in {out}",
             f"wrote: {', '.join(files)}",
             f"next: `vaegan-sample {out} --out samples.png`, `vaegan-eval {out}`, `vaegan-export {out} my-model`, "
             f"`vaegan-report {out}`"]
    if sync := run.tracker.sync_command():
        lines.append(f"upload the W&B run with: {sync}")
    return lines


def diverged_message(run: Run, first_skipped: int) -> str:
    """What a diverged run says: the checkpoint from before the weights its skipped steps kept (linked as
    checkpoints/last_good; no new checkpoint written) to resume with a lower learning rate."""
    streak = (f"the run diverged: the {run.config.max_consecutive_skips} steps from step {first_skipped} on were all "
              f"skipped (non-finite losses or gradients) with the weights of step {first_skipped - 1}, of which no "
              "checkpoint is written")
    try:
        kept = keep_last_good(checkpoints_dir(run.output_dir), first_skipped - 1)
    except OSError as err:
        return f"{streak}; linking checkpoints/last_good failed ({err}): resume from an earlier checkpoint"
    if kept is None:
        return f"{streak}, and none precedes them: start over with a lower --lr (or --gamma), with --resume none"
    return (f"{streak}. {kept} is kept as checkpoints/last_good, safe from pruning: resume from it with a lower --lr "
            f"(or --gamma): --resume {kept} --lr {run.config.lr / 10:g}")


def finish(run: Run, state: TrainState, ending: Ending, ran_steps: int, started: float) -> Ending:
    """Saves what the ending calls for (nothing when no step ran), tells the user, and returns the ending."""
    console, position, ran = run.console, state.position, ran_steps > 0
    if ending is Ending.FINISHED and ran and position.images_seen:  # a mid-epoch end gets pictures of its own
        save_pictures(run, f"step_{position.step:07d}")
    path = save(run, state) if (ran or ending is not Ending.FINISHED) and ending is not Ending.DIVERGED else None
    console.stop_progress()
    report: list[Path] = []
    if ending is Ending.FINISHED and run.accelerator.is_main_process:
        try:
            report = write_report(run.output_dir)
        except ReportError as err:
            console.info(f"report: {err}")
    run.tracker.finish(ending)
    if ending is Ending.DIVERGED and run.accelerator.is_main_process:
        console.error(diverged_message(run, position.step - run.config.max_consecutive_skips + 1))
    elif ending is Ending.PREEMPTED and run.config.requeue and run.accelerator.is_main_process:
        console.info(requeue_slurm_job())
    elif ending is Ending.FINISHED and path is not None:
        for line in closing_lines(run, state, ran_steps, time.perf_counter() - started, [path, *report]):
            console.info(line)
    return ending


def train(config: TrainConfig, accelerator: Accelerator, console: Console | None = None) -> Ending:
    """Trains to the run's end, a stop signal (saves first) or divergence (names the last good checkpoint).
    `console` shows the run (by default, a new one for this process)."""
    check_launch_free(config, accelerator)
    if accelerator.device.type == "cpu":
        configure_cpu(config.cpu_threads)
    console = console or Console(accelerator.is_main_process, accelerator.process_index)
    with output_dir_held(config, accelerator):
        run, state = start(config, accelerator, console)
        if run.last_step == state.position.step:  # a rerun of a finished run: say so, and leave its files as they are
            console.info(f"nothing to train: {run.output_dir} stands at step {run.last_step}, where these settings end "
                         "(raise --max-steps or --epochs to train on, or use another --output-dir; `vaegan-eval` "
                         "and `vaegan-report` score and report it, should its last evaluation have been cut short)")
            return Ending.FINISHED
        announce(run, state)
        first_step, started = state.position.step, time.perf_counter()
        # kept through the last save: a late signal waits for it
        with PreemptionWatch(console.info) as watch, StallWatch(console.warn_here) as stall:
            ending = train_loop(run, state, watch, stall)
            return finish(run, state, ending, state.position.step - first_step, started)
