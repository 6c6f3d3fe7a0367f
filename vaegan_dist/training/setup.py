"""Setting a run up: its output directory held, the checkpoint it resumes, the networks, the data and the
evaluation's reference, restored to the checkpoint's state and announced in a table."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, gather_object, set_seed
from torch import Tensor, nn

from vaegan_dist.checkpoint.layout import CheckpointError
from vaegan_dist.checkpoint.lineage import Branch, branch_for, set_aside
from vaegan_dist.checkpoint.metrics_log import MetricsLog
from vaegan_dist.checkpoint.policy import config_changes
from vaegan_dist.checkpoint.reading import Checkpoint, resolve_resume
from vaegan_dist.checkpoint.tensors import load_optimizer_tensors
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.data.images import load_images
from vaegan_dist.data.mnist import DataError
from vaegan_dist.data.sharding import ShardedBatches, derived_seed
from vaegan_dist.evaluation.reconstruction import HeldOut, held_out_images
from vaegan_dist.evaluation.scores import Reference
from vaegan_dist.model.networks import (
    Autoencoder,
    PerNetwork,
    build_models,
    compile_networks,
    images_to_pixels,
    moving_averages,
)
from vaegan_dist.training.console import Console, describe_processes
from vaegan_dist.training.cpu import cpu_flags, emulates_bf16
from vaegan_dist.training.cuda_graphs import GraphedStep
from vaegan_dist.training.launch_settings import processes_not_started
from vaegan_dist.training.metrics import MetricWindow
from vaegan_dist.training.output_lock import LockHeld, OutputLock
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import adam_optimizers
from vaegan_dist.training.trackers import Trackers

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
    networks: PerNetwork  # as accelerator.prepare returned them (DDP-wrapped on several processes): the step's
    modules: PerNetwork  # the same networks unwrapped: checkpoints, pictures, evaluations
    optimizers: PerNetwork  # plain torch optimizers, which the step drives itself (see train_step)
    averages: Autoencoder | None  # the encoder's and the decoder's moving averages (--ema-decay)
    shards: ShardedBatches
    fixed_z: Tensor  # the latent codes of every sample grid
    test_x: Tensor  # the test digits of every reconstruction grid
    reference: Reference | HeldOut | None  # what the evaluation compares against (None: off)
    tracker: Trackers  # --tracker: W&B, TensorBoard, both or none
    metrics: MetricsLog
    last_step: int
    graphed_step: GraphedStep | None = None  # --cuda-graphs: the step captured in a CUDA graph
    branch: Branch | None = None  # --resume PATH: the branch it continues or starts (checkpoint/lineage)

    @property
    def autoencoder(self) -> Autoencoder:
        """The pair that pictures and evaluations use: the moving averages where the run keeps them."""
        return self.averages if self.averages is not None else Autoencoder(self.modules.encoder, self.modules.decoder)


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


def on_main(accelerator: Accelerator, action: Callable[[], None]) -> None:
    """action on the main process; its CheckpointError is raised on every process (none is left waiting)."""
    problem = None
    if accelerator.is_main_process:
        try:
            action()
        except CheckpointError as err:
            problem = str(err)
    if problem := gather_object([problem])[0]:
        raise CheckpointError(problem)


def open_run(config: TrainConfig, accelerator: Accelerator,
             console: Console) -> tuple[Path, Checkpoint | None, Branch | None]:
    """The output directory, the checkpoint to resume (None: a fresh start) and, for --resume PATH, its branch."""
    output_dir = Path(config.output_dir)
    resume_from = resolve_resume(config.resume, output_dir, console.warn)
    branch = None
    if resume_from is not None and resume_from == Path(config.resume):  # a checkpoint named, not found
        branch = branch_for(resume_from, output_dir, config, console.info)
        resume_from = branch.resume
    if len(choices := set(gather_object([str(resume_from)]))) > 1:
        raise CheckpointError(f"the processes found different checkpoints to resume from ({sorted(choices)}): "
                              "put --output-dir on a file system that every machine shares")
    checkpoint = Checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        for key, old, new in config_changes(checkpoint.config, config):
            console.info(f"resume: overriding {key} = {old!r} from the checkpoint with {new!r}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write to output directory {output_dir} ({err.strerror}): choose a writable "
                          "--output-dir") from None
    if config.mixed_precision == "fp16" and accelerator.scaler is None:
        console.warn("fp16 needs a GPU; Accelerate runs fp32 here. Use --mixed-precision bf16.")
    if config.mixed_precision == "bf16" and accelerator.device.type == "cpu" and emulates_bf16(cpu_flags()):
        console.warn("this CPU has no bf16 instructions (AVX512_BF16, AMX or Arm's BF16): torch emulates bf16, "
                     "which is slower than fp32 here (2× to 50× as measured); use --mixed-precision no")
    if warning := processes_not_started(accelerator.num_processes):
        console.warn(warning)
    if config.gradient_allreduce != "fp32" and accelerator.num_processes == 1:
        console.warn(f"--gradient-allreduce {config.gradient_allreduce} has no effect in one process: there is "
                     "nothing to average")
    return output_dir, checkpoint, branch


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator: its mixed precision, and DDP averaging gradients in --gradient-allreduce's precision
    (torch's bf16_compress_hook: each process's gradient cast to bf16 and divided, summed in bf16, cast back)."""
    hook = {"fp32": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16}[config.gradient_allreduce]
    return Accelerator(mixed_precision=config.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(comm_hook=hook)])


def sync_batch_norm(networks: PerNetwork, accelerator: Accelerator) -> PerNetwork:
    """--sync-batchnorm: each batch norm normalises over every process's share of the batch (torch's SyncBatchNorm,
    which keeps the parameters' and buffers' names, so checkpoints and exports are the same either way). One
    process has nothing to sync with; torch syncs GPU tensors only."""
    if accelerator.num_processes == 1:
        return networks
    if accelerator.device.type != "cuda":
        raise ConfigError(f"setting 'sync_batchnorm' needs GPUs (torch's SyncBatchNorm syncs CUDA tensors only), "
                          f"and this run is on {accelerator.device.type}: drop --sync-batchnorm")
    return PerNetwork(*(nn.SyncBatchNorm.convert_sync_batchnorm(net) for net in networks))


def build_networks(config: TrainConfig, accelerator: Accelerator) -> tuple[PerNetwork, PerNetwork, PerNetwork]:
    """(the prepared networks, the same unwrapped, their plain optimizers), initialised alike on every process."""
    set_seed(config.seed)  # the same initial weights on every process (DDP broadcasts rank 0's as well)
    try:
        networks = build_models(config)
    except (RuntimeError, MemoryError) as err:  # torch's "can't allocate memory" (torch.OutOfMemoryError on a GPU)
        reason = " ".join(str(err).split())[:160]
        if not isinstance(err, MemoryError | torch.OutOfMemoryError) and "allocate" not in reason:
            raise
        raise ConfigError(f"the networks do not fit in memory ({reason}): lower --hidden-dim, --conv-width or "
                          "--latent-dim") from None
    if config.sync_batchnorm:
        networks = sync_batch_norm(networks, accelerator)
    if config.compile:
        compile_networks(networks)
    prepared = accelerator.prepare(*networks, *adam_optimizers(networks, config))
    set_seed(config.seed, device_specific=True)  # each process draws its own dropout masks and noise
    return (PerNetwork(*prepared[:3]), PerNetwork(*(accelerator.unwrap_model(net) for net in prepared[:3])),
            PerNetwork(*(optimizer.optimizer for optimizer in prepared[3:])))


def load_data(config: TrainConfig, accelerator: Accelerator) -> tuple[ShardedBatches, Tensor, Tensor]:
    """This process's shard of the training set on its device, the fixed codes of the sample grids, and the held-out
    test images (uint8, on the CPU). A folder is decoded once per node, by its first process, while the others
    wait."""
    batch_size = config.per_process_batch(accelerator.num_processes)
    problem = None
    with accelerator.local_main_process_first():  # an error on the first process must not leave the others waiting
        try:
            train_images, test_images = load_images(config, "train", "test")
        except DataError as err:
            problem = err
    if problem is not None:
        raise problem
    shards = ShardedBatches(train_images.to(accelerator.device), batch_size, accelerator.num_processes,
                            accelerator.process_index, config.seed)
    if shards.steps_per_epoch() == 0:
        raise ConfigError(f"setting 'batch_size' {batch_size} × {accelerator.num_processes} processes exceeds "
                          f"the {train_images.shape[0]} training images: use a smaller batch")
    fixed_z = torch.randn(NUM_FIXED_SAMPLES, config.latent_dim,
                          generator=torch.Generator().manual_seed(config.seed)).to(accelerator.device)
    return shards, fixed_z, test_images


def evaluation_reference(config: TrainConfig, accelerator: Accelerator, console: Console,
                         test_images: Tensor) -> Reference | HeldOut | None:
    """What evaluations compare against: MNIST's classifier and test set, or the held-out images (and, on the main
    process, the FID of samples against them where Inception can be had)."""
    if not config.eval_samples:
        return None
    if config.dataset != "mnist":
        return held_out_images(test_images, config.eval_samples, accelerator.device,
                               console.warn if accelerator.is_main_process else None)
    try:
        return Reference(accelerator.device)
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
    if position.images_seen > run.shards.images.shape[0]:
        raise CheckpointError(f"{checkpoint.path} stands {position.images_seen} images into an epoch of a data set of "
                              f"{run.shards.images.shape[0]}: it was trained on other data; resume it with its own "
                              "--data-dir, or start a new run (--resume none)")
    run.console.info(f"resume: from {checkpoint.path} (step {position.step}, epoch {position.epoch}, "
                     f"{position.images_seen} images into it); another --output-dir or --resume none starts afresh")
    return state


def start(config: TrainConfig, accelerator: Accelerator, console: Console) -> tuple[Run, TrainState]:
    """Everything the loop needs, restored from the checkpoint when the run resumes one."""
    output_dir, checkpoint, branch = open_run(config, accelerator, console)
    networks, modules, optimizers = build_networks(config, accelerator)
    shards, fixed_z, test_images = load_data(config, accelerator)
    test_x = images_to_pixels(test_images[:NUM_RECONSTRUCTED]).to(accelerator.device)
    run = Run(config, accelerator, console, output_dir, checkpoint, networks, modules, optimizers,
              moving_averages(config, modules) if config.ema_decay else None, shards, fixed_z, test_x,
              evaluation_reference(config, accelerator, console, test_images),
              Trackers(config.tracker, console.warn),
              MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process, console.warn), last_step=0)
    state = restore(run)
    run.branch = branch
    if branch is not None:
        state.branch_from = branch.origin
    run.last_step = state.position.step + steps_to_run(config, shards, state.position)
    run.graphed_step = GraphedStep() if config.cuda_graphs else None
    return run, state


def announce(run: Run, state: TrainState) -> None:
    """The run starts training: sets an abandoned branch aside (--resume PATH), cuts metrics.jsonl back to the
    checkpoint, writes the run's config.json, starts the W&B run (one per job: a resumed job continues the
    checkpoint's) and shows the run's table."""
    config, accelerator, shards, position = run.config, run.accelerator, run.shards, state.position
    if run.branch is not None and run.branch.new:
        on_main(accelerator, lambda: set_aside(run.output_dir, run.branch.resume, run.console.info))
    run.metrics.resume_at(position.step)  # what a crashed run logged past its checkpoint goes
    if accelerator.is_main_process:
        try:
            (run.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        except OSError as err:
            raise ConfigError(f"cannot write to output directory {run.output_dir} ({err.strerror}): choose a "
                              "writable --output-dir") from None
        run.tracker.start(config.wandb, {**config.to_dict(), "num_processes": accelerator.num_processes},
                          run.output_dir, run_id=state.wandb_run_id, timeout=config.wandb_timeout, step=position.step)
        state.wandb_run_id = run.tracker.run_id
    run.console.table("vaegan-dist", {
        "processes": describe_processes(accelerator),
        "mixed precision": accelerator.mixed_precision if accelerator.mixed_precision != "fp16" or accelerator.scaler
        else "fp16 asked, fp32 run (no GPU)",
        "batch": f"{shards.batch_size} per process, {shards.global_batch} global",
        "data": f"{shards.images.shape[0]} training images, {shards.steps_per_epoch() * shards.batch_size} per "
                "process per epoch",
        "steps": f"{shards.steps_per_epoch()} per epoch, {run.last_step - position.step} to run from step "
                 f"{position.step}",
        "outputs": str(run.output_dir),
        "resume from": f"{run.checkpoint.path} (step {position.step})" if run.checkpoint else "none (fresh start)",
        f"W&B ({run.tracker.mode})": run.tracker.location,
    })
    if run.checkpoint is None:
        run.console.info(f"starting a new run in {run.output_dir}")
    if run.tracker.active and run.tracker.mode == "offline":
        run.console.info(f"upload the W&B run later with: wandb sync {run.tracker.location}")


