"""Every setting of a run as one frozen dataclass, its presets, and the command line and files that fill it.

Precedence, lowest first: the preset (``--preset``, default ``default``), the config file
(``--config``, YAML or JSON with the field names as keys), then the flags (the field names with dashes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

Similarity = Literal["logit", "hidden"]
GeneratorLoss = Literal["minimax", "non_saturating"]
MixedPrecision = Literal["no", "bf16", "fp16"]
WandbMode = Literal["auto", "online", "offline", "disabled"]


MIN_EVAL_SAMPLES = 4  # precision and recall need k + 1 = 4 samples


class ConfigError(ValueError):
    """A setting that cannot be used. The message names the key and what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run. The defaults are the ``default`` preset."""

    # Losses (Larsen et al. 2016). gamma weighs the learned similarity in the decoder's loss,
    # beta in the encoder's; similarity picks Dis_l; generator_loss picks the decoder's GAN term.
    gamma: float = 1.0
    beta: float = 5.0
    similarity: Similarity = "hidden"
    generator_loss: GeneratorLoss = "non_saturating"
    # Networks: hidden_dim is the encoder's and decoder's width and the discriminator's first width
    # (it halves per layer); depth is the number of hidden layers in each network.
    latent_dim: int = 20
    hidden_dim: int = 1024
    depth: int = 3
    # Dropout before every linear layer; a per-network value, when set, replaces `dropout` there.
    dropout: float = 0.1
    encoder_dropout: float | None = 0.0
    decoder_dropout: float | None = 0.0
    discriminator_dropout: float | None = None
    # Spectral normalisation of every discriminator layer (Miyato et al. 2018).
    spectral_norm: bool = False
    # Adam, one optimizer per network, all with the same settings but the discriminator's learning rate, which is
    # lr × discriminator_lr_scale (a two time-scale update rule, Heusel et al. 2017, when above 1).
    lr: float = 3e-4
    discriminator_lr_scale: float = 1.0
    adam_beta1: float = 0.5
    adam_beta2: float = 0.999
    # lr_schedule "linear": lr until lr_decay_start (a fraction of the run's steps), then linearly down to 0 at
    # the run's last step; "constant": lr throughout.
    lr_schedule: Literal["constant", "linear"] = "constant"
    lr_decay_start: float = 0.5
    # A moving average of the decoder's weights, decay ema_decay per step (0: none). Samples, evaluations and
    # exports use it; training never reads it, so the trained weights are those of the same run without it.
    ema_decay: float = 0.999
    # batch_size is per process; global_batch_size, when set, replaces it with global / processes.
    batch_size: int = 64
    global_batch_size: int | None = None
    epochs: int = 50
    max_steps: int | None = None
    seed: int = 0
    # None: whatever `accelerate launch` was told (--mixed_precision or its config file), else "no".
    mixed_precision: MixedPrecision | None = None
    # data_dir None means the MNIST bundled with the package.
    data_dir: str | None = None
    output_dir: str = "outputs"
    log_every: int = 50
    # Checkpoints in <output_dir>/checkpoints: every save_every steps and at the end; the newest keep_last
    # are kept, and those at multiples of keep_every steps for good. resume: auto (the newest intact one, or
    # a fresh start), latest (the newest, which must exist), none, or a checkpoint's path.
    save_every: int = 2000
    keep_last: int = 3
    keep_every: int | None = None
    resume: str = "auto"
    # A periodic save that fails (disk full, permissions): stop the run (exit 3), or warn and continue.
    on_save_error: Literal["stop", "continue"] = "stop"
    # After a preemption save (SIGTERM/SIGUSR1), run `scontrol requeue $SLURM_JOB_ID` from the main process.
    requeue: bool = False
    # This many non-finite steps in a row (each skipped on every process) end the run with a checkpoint.
    max_consecutive_skips: int = 100
    # Threads per process on the CPU; None: the cores divided among this machine's processes. (Launchers
    # set OMP_NUM_THREADS=1, which would leave a single process on one core.)
    cpu_threads: int | None = None
    # torch.compile the three networks (slow to start; see the README's Performance section).
    compile: bool = False
    # The classifier-based evaluation (vaegan_dist.evaluation) every eval_every steps and always at the end,
    # on eval_samples samples; eval_every none: only at the end; eval_samples 0: never.
    eval_every: int | None = None
    eval_samples: int = 10_000
    # W&B: auto is online when an API key is configured, else offline. wandb_timeout bounds its start and
    # finish; image_every is the steps between sample and reconstruction grids sent to it.
    wandb: WandbMode = "auto"
    wandb_timeout: float = 30.0
    image_every: int = 500
    # Where the records and grids go: wandb, tensorboard (event files in <output_dir>/tensorboard), both as
    # "wandb,tensorboard", or none. metrics.jsonl and the PNGs are written either way.
    tracker: str = "wandb"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for key in ("latent_dim", "hidden_dim", "depth", "batch_size", "epochs", "log_every", "save_every",
                    "keep_last", "max_consecutive_skips", "image_every"):
            _require(key, getattr(self, key) > 0, "must be positive")
        for key in ("global_batch_size", "max_steps", "keep_every", "cpu_threads", "eval_every"):
            value = getattr(self, key)
            _require(key, value is None or value > 0, "must be positive (or none)")
        for key in ("gamma", "beta", "lr", "discriminator_lr_scale", "wandb_timeout"):
            _require(key, getattr(self, key) > 0, "must be positive")
        for key in ("adam_beta1", "adam_beta2", "ema_decay", "lr_decay_start"):
            _require(key, 0 <= getattr(self, key) < 1, "must be in [0, 1)")
        for key in ("dropout", "encoder_dropout", "decoder_dropout", "discriminator_dropout"):
            value = getattr(self, key)
            _require(key, value is None or 0 <= value < 1, "must be in [0, 1)")
        _require("eval_samples", self.eval_samples == 0 or self.eval_samples >= MIN_EVAL_SAMPLES,
                 f"must be 0 (no evaluation) or at least {MIN_EVAL_SAMPLES}")
        parts = self.tracker.split(",")
        _require("tracker", self.tracker == "none" or (set(parts) <= {"wandb", "tensorboard"}
                                                     and len(set(parts)) == len(parts)),
                 f"is {self.tracker!r}: choose wandb, tensorboard, both as wandb,tensorboard, or none")
        _require("hidden_dim", self.hidden_dim >> (self.depth - 1) >= 1,
                 f"is too small for depth {self.depth}: the discriminator halves it per layer")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The named preset, with `overrides` (field names as keys) on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(values) - FIELD_NAMES)
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


PRESETS: dict[str, dict[str, Any]] = {
    # The project's design, exactly: logit similarity, minimax decoder loss, dropout 0.1 everywhere.
    "seed": dict(gamma=25.0, beta=5.0, similarity="logit", generator_loss="minimax", dropout=0.1,
                 encoder_dropout=None, decoder_dropout=None, discriminator_dropout=None,
                 lr=1e-4, adam_beta1=0.9, adam_beta2=0.999, ema_decay=0.0, batch_size=128),
    # The design with the paper's learned similarity: a hidden layer of the discriminator.
    "paper": dict(gamma=25.0, beta=5.0, similarity="hidden", generator_loss="minimax", dropout=0.1,
                  encoder_dropout=None, decoder_dropout=None, discriminator_dropout=None,
                  lr=1e-4, adam_beta1=0.9, adam_beta2=0.999, ema_decay=0.0, batch_size=128),
    # Trains legible digits once gradients are routed correctly: hidden-layer similarity, non-saturating
    # decoder loss, γ = 1, Adam(2e-4, β1 = 0.5), batch 128, no dropout in the encoder and decoder (see README).
    "starting_point": dict(lr=2e-4, ema_decay=0.0, batch_size=128),
    # The starting point with lr 3e-4 and batch 64 (twice the steps in the same epochs), sampled from the
    # decoder's moving average: under half its classifier-FID after 50 epochs (README, Results).
    "default": {},
}
DEFAULT_PRESET = "default"
FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


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
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"setting {key!r} must be {hint.__name__}, not {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file (a mapping of field names, and optionally `preset`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} does not parse: {str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    return values


def _flag_type(hint: Any) -> dict[str, Any]:
    """argparse keywords that parse a flag into a value of this field's type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return {"choices": typing.get_args(hint)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    base = hint

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return {"type": parse, "metavar": base.__name__.upper()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the VAE/GAN of Larsen et al. (2016) on MNIST with Accelerate.",
        epilog="Defaults shown are the default preset's; --preset changes some of them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                        help=f"named settings to start from (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML or JSON file of settings (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            help=f"(default: {getattr(defaults, f.name)})", **_flag_type(hints[f.name]))
    return parser


def agent_flag_forms(argv: list[str]) -> list[str]:
    """The flags as the parser knows them, from the forms a W&B sweep agent writes: the field's name, underscores
    and all, as `--key=value` (`${args}`) or `--key value` (`${args_no_equals}`); booleans with a value (True,
    False) or alone when true (`${args_no_boolean_flags}`). So `--ema_decay=0.9` becomes `--ema-decay=0.9`,
    `--spectral_norm=True` `--spectral-norm` and `--spectral_norm False` `--no-spectral-norm`. Values and
    everything else pass unchanged."""
    booleans = {f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig) if f.type in ("bool", bool)}
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    normalised, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or arg == "--":
            normalised.append(arg)
            continue
        name = name[2:].replace("_", "-")
        if name in booleans and not eq and rest and rest[0].lower() in words:
            eq, value = "=", rest.pop(0)
        if name in booleans and eq and value.lower() in words:
            normalised.append(f"--{name}" if words[value.lower()] else f"--no-{name}")
        else:
            normalised.append(f"--{name}{eq}{value}")
    return normalised


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config the command line asks for: preset, then config file, then flags."""
    flags = vars(build_parser().parse_args(agent_flag_forms(sys.argv[1:] if argv is None else argv)))
    config_file = flags.pop("config", None)
    file_values = load_config_file(config_file) if config_file else {}
    preset = flags.pop("preset", file_values.pop("preset", DEFAULT_PRESET))
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[preset], **file_values, **flags},
                                 source=f"config file {config_file}")
