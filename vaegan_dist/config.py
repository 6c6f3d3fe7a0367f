"""Every setting of a run as one frozen dataclass (its presets: vaegan_dist.presets; vaegan_dist.cli.config_file
reads the files that fill it).

Precedence, lowest first: the preset (``--preset``, default ``default``), the config file
(``--config``, YAML or JSON with the field names as keys), then the flags (the field names with dashes;
vaegan_dist.cli.train reads them).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from vaegan_dist.presets import PRESETS

Architecture = Literal["mlp", "conv"]
Dataset = Literal["mnist", "fashion_mnist", "cifar10", "folder"]
Similarity = Literal["logit", "hidden"]
GeneratorLoss = Literal["minimax", "non_saturating"]
MixedPrecision = Literal["no", "bf16", "fp16"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
GradientAllreduce = Literal["fp32", "bf16"]


MIN_EVAL_SAMPLES = 4  # precision and recall need k + 1 = 4 samples
MAX_EVAL_SAMPLES = 60_000  # the floor uses as many training images, and MNIST has 60000
MNIST_SIZE = 28
# The data sets of one image shape, (channels, side), read from their files as torchvision keeps them (--data-dir).
FIXED_SHAPES = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MAX_SEED = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too) are 32-bit
MAX_CPU_THREADS = 1024  # far beyond any useful count; 100000 threads make the process fail to load libraries
MAX_WANDB_TIMEOUT = 86400.0  # a day; waits longer than the platform's time_t overflow
# Adam moves a weight by at most about lr·(1 − β1)/√(1 − β2) a step, whatever the gradient: with every network's
# learning rate at most this, no finite run of steps takes a float32 weight near its limit.
MAX_LR = 1.0


class ConfigError(ValueError):
    """A setting that cannot be used. The message names the key and what to do."""


def setting(default: Any, help: str) -> Any:
    """A TrainConfig field: its default, and its meaning, which `--help` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run. The defaults are the ``default`` preset."""

    # Losses (Larsen et al. 2016)
    gamma: float = setting(1.0, "weight of rec, the learned similarity, in the decoder's loss")
    beta: float = setting(5.0, "weight of rec in the encoder's loss")
    similarity: Similarity = setting("hidden", "Dis_l: the discriminator's logit (the design) or its last hidden "
                                     "layer (the paper)")
    generator_loss: GeneratorLoss = setting("non_saturating", "the decoder's GAN term: minimax (−dis_loss, the "
                                            "design) or non_saturating")
    gan_margin: float | None = setting(None, "the paper's equilibrium rule: the discriminator rests while its cost "
                                       "on real or generated images is below gan_equilibrium − this, the decoder while "
                                       "above + this (none: every network steps, the design; the paper: 0.35)")
    gan_equilibrium: float = setting(0.68, "the discriminator's cost that --gan-margin holds it near (the paper's)")
    # The autoencoder's terms (the design: 1, 0, off, 0); see docs/architecture.md, "What one step computes"
    kl_weight: float = setting(10.0, "multiplies the KL divergence, which the design divides by B·784 (784 weighs "
                               "each image's KL in full)")
    pixel_weight: float = setting(10.0, "weight of mean((x̃ − x)²) on [-1, 1] pixels in the encoder's and the "
                                  "decoder's loss (never the discriminator's)")
    normalise_similarity: bool = setting(True, "divide rec by mean(Dis_l(x)²), detached, so that it does not "
                                         "grow as the discriminator's features sharpen")
    prior_match_weight: float = setting(10.0, "weight, in the encoder's loss, of how far the batch's codes are from "
                                        "N(0, I) in each dimension's mean and variance (holds the aggregate "
                                        "posterior near the prior)")
    # Networks
    architecture: Architecture = setting("mlp", "mlp: the design's fully connected networks (hidden_dim, depth); "
                                         "conv: the paper's convolutional ones (conv_width, encoder_batch_norm)")
    latent_dim: int = setting(20, "size of z")
    hidden_dim: int = setting(1024, "mlp: width of the encoder's and decoder's hidden layers, and the "
                              "discriminator's first (it halves per layer)")
    depth: int = setting(3, "mlp: hidden layers in each network")
    conv_width: float = setting(1.0, "conv: channels and units as a multiple of the paper's (0.25 trains on a CPU)")
    dropout: float = setting(0.1, "dropout before every layer of the mlp networks and of the conv discriminator, "
                             "where no per-network value replaces it")
    encoder_dropout: float | None = setting(0.0, "the encoder's dropout (none: --dropout)")
    decoder_dropout: float | None = setting(0.0, "the decoder's dropout (none: --dropout)")
    discriminator_dropout: float | None = setting(None, "the discriminator's dropout (none: --dropout)")
    spectral_norm: bool = setting(False, "spectral normalisation of every discriminator layer (Miyato et al. "
                                  "2018)")
    encoder_batch_norm: bool = setting(False, "conv: batch norm in the encoder, as the paper has it (off: with it, "
                                       "every batch's codes have the same mean and spread, so the prior match holds "
                                       "nothing)")
    sync_batchnorm: bool = setting(False, "conv on several GPUs: batch norm over the whole batch of all processes "
                                   "(torch's SyncBatchNorm), not each process's share")
    # Optimisation: one Adam per network
    lr: float = setting(3e-4, "Adam's learning rate")
    discriminator_lr_scale: float = setting(1.0, "the discriminator's learning rate is lr times this (two "
                                            "time-scale updates when above 1)")
    adam_beta1: float = setting(0.5, "Adam's β1")
    adam_beta2: float = setting(0.999, "Adam's β2")
    lr_schedule: Literal["constant", "linear"] = setting("constant", "constant: lr throughout; linear: lr until "
                                                         "lr_decay_start, then down to 0 at the last step")
    lr_decay_start: float = setting(0.5, "where the linear schedule starts to decay, as a fraction of the run")
    ema_decay: float = setting(0.999, "decay per step of moving averages of the encoder's and decoder's weights, which "
                               "samples, evaluations and exports use; training never reads it (0: none)")
    # Data and run length
    batch_size: int = setting(64, "images per step per process")
    global_batch_size: int | None = setting(None, "images per step over all processes, instead of batch_size")
    epochs: int = setting(50, "passes over the training set")
    max_steps: int | None = setting(None, "stop after this many global steps, mid-epoch if need be")
    seed: int = setting(0, "seeds the initial weights, the data order and the noise")
    mixed_precision: MixedPrecision | None = setting(None, "no, bf16 or fp16 (none: what accelerate launch was "
                                                     "told, else no)")
    dataset: Dataset = setting("mnist", "mnist: the bundled MNIST, or the four IDX files in --data-dir; "
                               "fashion_mnist, cifar10: their files in --data-dir, as torchvision keeps them; folder: "
                               "every PNG and JPEG image under --data-dir, at any depth")
    data_dir: str | None = setting(None, "mnist: a directory with the four IDX files (none: the bundled copy); "
                                   "fashion_mnist, cifar10: where their files are; folder: the image folder")
    image_size: int | None = setting(None, "side of the square images the networks take (none: the data set's, "
                                     "28 or CIFAR's 32); a folder's images are centre-cropped and resized to it")
    channels: int | None = setting(None, "1 (grey) or 3 (colour) (none: the data's own: 1 for MNIST and "
                                   "Fashion-MNIST, 3 for CIFAR-10 and a folder)")
    # Outputs, checkpoints and resuming
    output_dir: str = setting("outputs", "where everything goes")
    log_every: int = setting(50, "steps between records in metrics.jsonl, W&B and the console")
    save_every: int = setting(2000, "steps between checkpoints (one is always written at the end)")
    keep_last: int = setting(3, "checkpoints kept, newest first")
    keep_every: int | None = setting(None, "also keep for good the checkpoints at multiples of this many steps")
    resume: str = setting("auto", "auto (the newest intact checkpoint, or a fresh start), latest (which must "
                          "exist), none, or a checkpoint's path")
    on_save_error: Literal["stop", "continue"] = setting("stop", "a periodic save that fails: stop the run (exit "
                                                         "3), or warn and try again at the next")
    requeue: bool = setting(False, "after a preemption save, run `scontrol requeue $SLURM_JOB_ID`")
    max_consecutive_skips: int = setting(100, "skipped steps in a row (non-finite losses or gradients) that "
                                         "end the run, with a checkpoint (exit 4)")
    # Speed
    cpu_threads: int | None = setting(None, "threads per process on the CPU (none: the cores divided among this "
                                      "machine's processes)")
    compile: bool = setting(False, "torch.compile the three networks (slow to start)")
    gradient_allreduce: GradientAllreduce = setting("fp32", "the precision in which DDP averages gradients over "
                                                    "processes; bf16 sends half the bytes but rounds each averaged "
                                                    "gradient to 8 significant bits (a change of the math)")
    cuda_graphs: bool = setting(False, "capture the whole step in one CUDA graph and replay it: one launch a step "
                                "instead of some 200 (one CUDA process; not with fp16 or --compile)")
    # Evaluation and W&B
    eval_every: int | None = setting(None, "steps between evaluations (none: only at the end)")
    eval_every_images: int | None = setting(None, "training images (over all processes) between evaluations, "
                                            "instead of --eval-every: runs of other batch sizes evaluate at the "
                                            "same images (sweeps)")
    keep_best: bool = setting(False, "keep the checkpoint of the best evaluation (lowest eval/fid on MNIST, "
                              "eval/recon_mse on other images) as checkpoints/best, safe from pruning")
    eval_samples: int = setting(10_000, "samples per evaluation (0: no evaluation)")
    wandb: WandbMode = setting("auto", "W&B mode; auto: online when an API key is configured, else offline")
    wandb_timeout: float = setting(30.0, "seconds W&B may take to start and to finish a run")
    image_every: int = setting(500, "steps between the sample and reconstruction grids sent to the trackers")
    tracker: str = setting("wandb", "where records and grids go: wandb, tensorboard (event files in "
                           "<output_dir>/tensorboard), both as wandb,tensorboard, or none")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for key in ("latent_dim", "hidden_dim", "depth", "batch_size", "epochs", "log_every", "save_every",
                    "keep_last", "max_consecutive_skips", "image_every"):
            _require(key, getattr(self, key) > 0, "must be positive")
        for key in ("global_batch_size", "max_steps", "keep_every", "cpu_threads", "eval_every", "eval_every_images"):
            value = getattr(self, key)
            _require(key, value is None or value > 0, "must be positive (or none)")
        for key in ("gamma", "beta", "lr", "discriminator_lr_scale", "wandb_timeout", "conv_width", "gan_equilibrium"):
            _require(key, getattr(self, key) > 0, "must be positive")
        for key in ("output_dir", "resume", "data_dir"):
            _require(key, getattr(self, key) != "", "cannot be empty (none: leave it out)")
        _require("seed", 0 <= self.seed <= MAX_SEED, f"must be in [0, {MAX_SEED}]")
        _require("cpu_threads", self.cpu_threads is None or self.cpu_threads <= MAX_CPU_THREADS,
                 f"must be at most {MAX_CPU_THREADS}")
        _require("lr", self.lr * max(1.0, self.discriminator_lr_scale) <= MAX_LR,
                 f"times discriminator_lr_scale must be at most {MAX_LR:g} (Adam's learning rates are ~1e-4)")
        _require("wandb_timeout", self.wandb_timeout <= MAX_WANDB_TIMEOUT, f"must be at most {MAX_WANDB_TIMEOUT:g} s")
        _require("gan_margin", self.gan_margin is None or self.gan_margin >= 0, "must be 0 or more (or none)")
        for key in ("kl_weight", "pixel_weight", "prior_match_weight"):
            _require(key, getattr(self, key) >= 0, "must be 0 or more")
        for key in ("adam_beta1", "adam_beta2", "ema_decay", "lr_decay_start"):
            _require(key, 0 <= getattr(self, key) < 1, "must be in [0, 1)")
        for key in ("dropout", "encoder_dropout", "decoder_dropout", "discriminator_dropout"):
            value = getattr(self, key)
            _require(key, value is None or 0 <= value < 1, "must be in [0, 1)")
        _require("eval_samples", self.eval_samples == 0 or MIN_EVAL_SAMPLES <= self.eval_samples <= MAX_EVAL_SAMPLES,
                 f"must be 0 (no evaluation) or from {MIN_EVAL_SAMPLES} to {MAX_EVAL_SAMPLES} (the floor uses as "
                 "many training images)")
        _require("eval_every_images", not (self.eval_every_images and self.eval_every), "and 'eval_every' are both "
                 "set: choose one")
        _require("keep_best", not self.keep_best or self.eval_samples, "needs evaluations (eval_samples > 0)")
        _require("sync_batchnorm", not self.sync_batchnorm or self.architecture == "conv",
                 "needs --architecture conv: the mlp networks have no batch norm")
        _require("cuda_graphs", not (self.cuda_graphs and self.compile),
                 "cannot be combined with 'compile': choose one of --cuda-graphs and --compile")
        _require("cuda_graphs", not (self.cuda_graphs and self.mixed_precision == "fp16"),
                 "does not support fp16's loss scaling: use --mixed-precision bf16 or no")
        parts = self.tracker.split(",")
        _require("tracker", self.tracker == "none" or (set(parts) <= {"wandb", "tensorboard"}
                                                     and len(set(parts)) == len(parts)),
                 f"is {self.tracker!r}: choose wandb, tensorboard, both as wandb,tensorboard, or none")
        self._check_images()
        _require("hidden_dim", self.hidden_dim >> (self.depth - 1) >= 1,
                 f"is too small for depth {self.depth}: the discriminator halves it per layer")

    def _check_images(self) -> None:
        _require("image_size", self.image_size is None or MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
                 f"must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (or none)")
        _require("channels", self.channels in (None, 1, 3), "must be 1, 3 or none")
        if self.dataset in FIXED_SHAPES:
            channels, side = FIXED_SHAPES[self.dataset]
            _require("image_size", self.image_size in (None, side), f"must be {side} (or none) for {self.dataset}")
            _require("channels", self.channels in (None, channels), f"must be {channels} (or none) for {self.dataset}")
        else:  # (data_dir is checked where the images are read: an export's config names no path)
            _require("image_size", self.image_size is not None, f"must be given for --dataset {self.dataset}: the side "
                     "its images are cropped and resized to (e.g. 64)")
        _require("batch_size", self.architecture != "conv" or self.batch_size >= 2,
                 "must be at least 2 with --architecture conv: batch norm needs two images per process")
        _require("image_size", self.architecture != "conv" or self.image_shape[1] % 2 == 0,
                 f"is {self.image_shape[1]}: the conv networks take an even side")
        for network in ("encoder", "decoder"):
            _require(f"{network}_dropout", self.architecture != "conv" or not getattr(self, f"{network}_dropout"),
                     "must be 0 or none with --architecture conv: the paper's encoder and decoder have no dropout")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, side, side) of the images the networks take (image_shape_of)."""
        return image_shape_of(self.dataset, self.image_size, self.channels)

    @property
    def image_pixels(self) -> int:
        """C·H·W: the length of the rows of pixels the networks take and give."""
        channels, height, width = self.image_shape
        return channels * height * width

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The named preset, with `overrides` (field names as keys) on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(values) - FIELD_NAMES, key=str)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in {source}: known settings are "
                              f"{', '.join(sorted(FIELD_NAMES))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def network_dropout(self, network: str) -> float:
        """The dropout of 'encoder', 'decoder' or 'discriminator'."""
        value = getattr(self, f"{network}_dropout")
        return self.dropout if value is None else value

    def network_lr_scale(self, network: str) -> float:
        """The factor on the scheduled learning rate of 'encoder', 'decoder' or 'discriminator'."""
        return self.discriminator_lr_scale if network == "discriminator" else 1.0

    def per_process_batch(self, num_processes: int) -> int:
        if self.global_batch_size is None:
            return self.batch_size
        if self.global_batch_size % num_processes:
            raise ConfigError(f"global_batch_size {self.global_batch_size} does not split evenly over "
                              f"{num_processes} processes: use a multiple of {num_processes}")
        return self.global_batch_size // num_processes


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def image_shape_of(dataset: str, image_size: int | None, channels: int | None) -> tuple[int, int, int]:
    """(channels, side, side): the settings, else the data set's (a folder's: 3 channels, MNIST's side)."""
    own_channels, own_side = FIXED_SHAPES.get(dataset, (3, MNIST_SIZE))
    side = image_size or own_side
    return (channels or own_channels, side, side)


def _require(key: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"setting {key!r} {problem}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the field's type hint; ints pass for floats. Raises ConfigError."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"setting {key!r} cannot be none")
    if type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if value not in args:
            raise ConfigError(f"setting {key!r} is {value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return _finite(key, float(value))
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return _finite(key, float(value))
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"setting {key!r} must be {hint.__name__}, not {value!r}")


def _finite(key: str, value: float) -> float:
    """value, unless it is inf or nan: such a setting would reach the weights (--lr inf fills them with NaN)."""
    if not math.isfinite(value):
        raise ConfigError(f"setting {key!r} is {value}: it must be a finite number")
    return value
