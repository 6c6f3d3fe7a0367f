"""What every command's command line shares: one-line errors with close matches, and the flags' types."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn

from vaegan_dist import __version__
from vaegan_dist.checkpoint.layout import WEIGHTS
from vaegan_dist.config import MAX_SEED
from vaegan_dist.exits import fail


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the examples as written; after each flag's help its default, unless the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a command-line mistake is one line like every other error, `error: ...`, with the close matches
    of a mistyped flag or choice and a pointer to --help, and exit status EXIT_BAD_INPUT; not the whole usage.
    Every command has --version; its --help shows every default and the `examples` given."""

    def __init__(self, *args: Any, examples: list[str] = (), **kwargs: Any) -> None:
        epilog = "\n".join(filter(None, [kwargs.pop("epilog", None),
                                         "examples:\n" + "\n".join(f"  {line}" for line in examples)]))
        super().__init__(*args, formatter_class=HelpFormatter, epilog=epilog, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message: str) -> NoReturn:
        hint = ""
        if unknown := re.match(r"unrecognized arguments: (.*)", message):
            flags = [word for word in unknown.group(1).split() if word.startswith("-")]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            matches = {flag: difflib.get_close_matches(flag.split("=")[0], options, n=2) for flag in flags}
            hint = "".join(f"; {flag}: did you mean {' or '.join(close)}?" for flag, close in matches.items() if close)
            if len(flags) == 1 and hint:
                hint = hint.replace(f"; {flags[0]}:", ";")
        elif choice := re.match(r"argument (\S+): invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message):
            choices = [c.strip(" '\"") for c in choice.group(3).split(",")]
            if close := difflib.get_close_matches(choice.group(2), choices, n=2):
                hint = f"; did you mean {' or '.join(close)}?"
        line = " ".join(f"{message}{hint}".split())
        fail(f"{self.prog}: {line} ({self.prog} --help lists the flags)")


def seed_flag(text: str) -> int:
    """argparse type of a --seed: an int in [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {value} is not in [0, {MAX_SEED}]")
    return value


def device_flag(text: str) -> str:
    """argparse type of a --device: one torch knows, and that this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {torch.cuda.device_count()} GPUs")
    return text


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="ema: the encoder's and the decoder's "
                        "moving averages, where the run kept them (--ema-decay); raw: the trained ones")


PRIORS = ("normal", "mixture")  # vaegan_dist.evaluation.prior.prior_codes


def add_prior_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", choices=PRIORS, default="normal", help="where the samples' codes come from: "
                        "normal, N(0, I), the prior the networks trained with (the paper's); mixture, a mixture of "
                        "10 Gaussians fitted to the codes μ(x) of 10,000 training images, which follows where the "
                        "encoder puts images (seconds on a CPU for 20 dimensions; needs the training images)")
