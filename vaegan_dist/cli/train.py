"""`vaegan-train`, `python -m vaegan_dist.train` and `accelerate launch train.py`: the training command.

Its flags are TrainConfig's fields with dashes; precedence, lowest first: the preset, the config file, the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Literal

import torch

from vaegan_dist.checkpoint.layout import CheckpointError
from vaegan_dist.checkpoint.output_paths import refuse_output
from vaegan_dist.cli.args import ArgumentParser
from vaegan_dist.cli.config_file import load_config_file
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.data.mnist import DataError
from vaegan_dist.exits import EXIT_BAD_INPUT, EXIT_CHECKPOINT_FAILED, Ending, fail, leave
from vaegan_dist.presets import DEFAULT_PRESET, PRESETS
from vaegan_dist.training.console import Console
from vaegan_dist.training.launch_settings import is_main_launch_process, unsupported_launch_setting
from vaegan_dist.training.loop import train
from vaegan_dist.training.setup import make_accelerator


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
    parser = ArgumentParser(  # prog: the name it was started by (vaegan-train, train.py)
        description="Train the VAE/GAN of Larsen et al. (2016) with Accelerate: on the bundled MNIST by default, "
        "or on a folder of images (--dataset folder --data-dir DIR).",
        epilog="Defaults shown are the default preset's; --preset changes some of them. A rerun in the same "
        "--output-dir resumes it (--resume auto).",
        examples=["accelerate launch train.py                                  # the default, on every GPU",
                  "vaegan-train --max-steps 200 --output-dir runs/quick         # a short run on this machine",
                  "accelerate launch train.py --preset celeba64 --data-dir img_align_celeba"])
    parser.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                        help=f"named settings to start from (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML or JSON file of settings (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)})",
                            **_flag_type(hints[f.name]))
    return parser


# The names diffusers' and transformers' training scripts use for the same settings.
ALIASES = {"learning-rate": "lr", "resume-from-checkpoint": "resume", "checkpointing-steps": "save-every",
           "report-to": "tracker"}


def agent_flag_forms(argv: list[str]) -> list[str]:
    """The flags as the parser knows them, from the forms a W&B sweep agent writes: the field's name, underscores
    and all, as `--key=value` (`${args}`) or `--key value` (`${args_no_equals}`); booleans with a value (True,
    False) or alone when true (`${args_no_boolean_flags}`). So `--ema_decay=0.9` becomes `--ema-decay=0.9`,
    `--spectral_norm=True` `--spectral-norm` and `--spectral_norm False` `--no-spectral-norm`. The names of
    diffusers' scripts become ours (ALIASES: `--learning_rate` is `--lr`). Values and everything else pass
    unchanged."""
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
        name = ALIASES.get(name, name)
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
    config = TrainConfig.from_dict({**PRESETS[preset], **file_values, **flags}, source=f"config file {config_file}")
    refuse_output(config.output_dir, "--output-dir")
    if config.data_dir is not None:  # MNIST may be downloaded into it
        refuse_output(config.data_dir, "--data-dir")
    return config


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
    except KeyboardInterrupt:  # a second Ctrl-C, or one while the run starts
        fail("stopped by Ctrl-C: nothing was saved since the last checkpoint", Ending.INTERRUPTED)
    finally:  # with a process group here, leave() did not run: an unexpected error, whose traceback follows
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
