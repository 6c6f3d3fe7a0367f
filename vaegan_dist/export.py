"""The encoder and decoder as plain files. An export is what `vaegan_dist.VAEGAN.save_pretrained` writes (the
Hugging Face format): `config.json` (TrainConfig.to_dict()), `model.safetensors` (the keys `encoder.*` and
`decoder.*`) and a model card, README.md. Checkpoint directories, and exports made before that format, hold
`encoder.safetensors` and `decoder.safetensors` (the state_dict keys of the unwrapped modules) next to
`config.json`; everything that reads networks reads all of them. A checkpoint of a run with --ema-decay also holds
`encoder_ema.safetensors` and `decoder_ema.safetensors`, the moving averages (checkpoints of version 0.2: the
decoder's alone): readers take them by default (weights "ema") and the trained networks with weights "raw"; an
export holds the one pair it was made with.

Only torch, safetensors and json are involved, never pickle. The decoder is simple enough to run without
this package; the README's script does that with torch and safetensors alone.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vaegan_dist.checkpoint import AVERAGE_FILES, checkpoints_dir, newest_complete
from vaegan_dist.config import ArgumentParser, ConfigError, TrainConfig
from vaegan_dist.exits import fail
from vaegan_dist.guard import OutputError, refuse_output
from vaegan_dist.models import Decoder, Encoder, build_models

CONFIG_FILE = "config.json"
NETWORK_FILES = {"encoder": "encoder.safetensors", "decoder": "decoder.safetensors"}  # checkpoints, old exports
MODEL_FILE = "model.safetensors"  # exports: both networks, keys prefixed with "encoder." and "decoder."
CARD_FILE = "README.md"
WEIGHTS = ("ema", "raw")  # which networks to read: their moving averages where the directory has them, or the trained


class ExportError(RuntimeError):
    """A directory that does not hold loadable networks. The message names the file and what to do."""


def export_networks(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, directory: str | Path,
                    dtype: torch.dtype = torch.float16, card: dict[str, Any] | None = None) -> Path:
    """Writes what VAEGAN.save_pretrained writes, weights cast to dtype, into directory: config.json,
    model.safetensors and the model card README.md (card: its license, metrics, source and command)."""
    from vaegan_dist.hub import VAEGAN  # hub builds on this module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CARD_FILE).unlink(missing_ok=True)  # save_pretrained keeps an existing card
    copies = [copy.deepcopy(network).to("cpu", dtype) for network in (encoder, decoder)]
    model = VAEGAN.from_networks(config, *copies)
    model.card_extras = dict(card or {})
    model.save_pretrained(directory)
    return directory


def network_directory(directory: str | Path) -> Path:
    """The directory itself, or for a run's output directory, its newest intact checkpoint."""
    directory = Path(directory)
    if ((directory / NETWORK_FILES["decoder"]).exists() or (directory / MODEL_FILE).exists()
            or not checkpoints_dir(directory).is_dir()):
        return directory
    newest = newest_complete(checkpoints_dir(directory), report=lambda line: None)
    if newest is None:
        raise ExportError(f"{directory} is an output directory without a complete checkpoint: train longer, or "
                          "pass a checkpoint or export directory")
    return newest


def load_networks(directory: str | Path, device: torch.device | str = "cpu",
                  weights: str = "ema") -> tuple[TrainConfig, Encoder, Decoder]:
    """(config, encoder, decoder) from an export or checkpoint directory, or a run's output directory (its newest
    intact checkpoint), in float32 and eval mode on device. weights "ema" reads the moving averages where the
    directory has them, "raw" the trained networks."""
    if weights not in WEIGHTS:
        raise ExportError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    directory = network_directory(directory)
    averaged = {name: f"{AVERAGE_FILES[name]}.safetensors" for name in averages_in(directory, weights)}
    files = {**NETWORK_FILES, **averaged}
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{directory} holds no {CONFIG_FILE}: pass a checkpoint or export directory "
                          "(one with config.json and model.safetensors, or encoder.safetensors and "
                          "decoder.safetensors)")
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ExportError(f"{config_path} is not a usable config ({err}): restore it from the run's "
                          "output directory") from None
    with torch.device("meta"):  # no random initialisation: loading draws nothing from the global RNG
        encoder, decoder, _ = build_models(config)
    combined = (directory / MODEL_FILE).is_file()
    for name, network in (("encoder", encoder), ("decoder", decoder)):
        path = directory / (MODEL_FILE if combined else files[name])
        try:
            state = {key: t.to(device, torch.float32) for key, t in load_file(path).items()}
            if combined:
                state = {key.removeprefix(f"{name}."): t for key, t in state.items() if key.startswith(f"{name}.")}
            network.load_state_dict(state, assign=True)
        except (OSError, SafetensorError, RuntimeError) as err:
            reason = " ".join(" ".join(str(err).strip().splitlines()[:2]).split())  # torch's first mismatch
            raise ExportError(f"cannot load the {name} from {path} ({reason}): it is missing, damaged, or "
                              f"does not match {CONFIG_FILE}") from None
        if bad := [key for key, t in state.items() if not torch.isfinite(t).all()]:
            raise ExportError(f"the {name} in {path} has non-finite weights ({bad[0]}): its digits would be "
                              "blank; use another checkpoint or export")
    return config, encoder.eval(), decoder.eval()


def averages_in(directory: Path, weights: str) -> list[str]:
    """The networks whose moving averages a reader with these weights takes from directory."""
    return [name for name, file in AVERAGE_FILES.items()
            if weights == "ema" and (directory / f"{file}.safetensors").is_file()]


def averages_note(names: list[str]) -> str:
    """' (the moving averages of the encoder and the decoder)', or of one of them, or nothing."""
    return f" (the moving average{'s' * (len(names) > 1)} of the {' and the '.join(names)})" if names else ""


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="ema (default): the encoder's and the "
                        "decoder's moving averages, where the run kept them (--ema-decay); raw: the trained ones")


def main(argv: list[str] | None = None) -> None:
    """vaegan-export SOURCE OUT: the encoder and decoder of a checkpoint (or a run's newest) as an export in the
    Hugging Face format (VAEGAN.from_pretrained reads it; vaegan-sample and vaegan-eval too), with a model card."""
    parser = ArgumentParser(prog="vaegan-export", description=main.__doc__)
    parser.add_argument("source", help="a checkpoint directory, or a run's output directory (its newest checkpoint)")
    parser.add_argument("out", help="the export directory to write")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="the weights' type")
    parser.add_argument("--license", default="other", help="the model card's license (a Hub license id, e.g. "
                        "mit or apache-2.0; default other: see the repository)")
    add_weights_flag(parser)
    args = parser.parse_args(argv)
    from vaegan_dist.hub import run_metrics

    try:
        refuse_output(args.out, "the export directory", (args.source, network_directory(args.source)), directory=True)
        config, encoder, decoder = load_networks(args.source, weights=args.weights)
        source = network_directory(args.source)
        averaged = averages_note(averages_in(source, args.weights))
        card = {"license": args.license, "metrics": run_metrics(source),
                "source": f"Exported by `vaegan-export` from `{source.name}`"
                          + averaged}
        export_networks(encoder, decoder, config, args.out, getattr(torch, args.dtype), card)
    except (ExportError, OutputError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write the export to {args.out} ({err.strerror or err}): choose a writable directory")
    print(f"exported the encoder and decoder of {source} to {args.out}"
          + averaged)


if __name__ == "__main__":
    main()
