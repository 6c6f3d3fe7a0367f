"""The encoder and decoder as plain files. An export is what `vaegan_dist.VAEGAN.save_pretrained` writes (the
Hugging Face format): `config.json` (the PORTABLE_SETTINGS of the run's TrainConfig, with keys starting with "_"
for the class and the version), `model.safetensors` (the keys `encoder.*` and
`decoder.*`) and a model card, README.md. Checkpoint directories, and exports made before that format, hold
`encoder.safetensors` and `decoder.safetensors` (the state_dict keys of the unwrapped modules) next to
`config.json`; everything that reads networks reads all of them. A checkpoint of a run with --ema-decay also holds
`encoder_ema.safetensors` and `decoder_ema.safetensors`, the moving averages (checkpoints of version 0.2: the
decoder's alone): readers take them by default (weights "ema") and the trained networks with weights "raw"; an
export holds the one pair it was made with.

Only torch, safetensors and json are involved, never pickle. The decoder is simple enough to run without
this package; docs/evaluation.md's script does that with torch and safetensors alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from vaegan_dist.checkpoint.contents import saved_config
from vaegan_dist.checkpoint.layout import MARKER, WEIGHTS, checkpoints_dir
from vaegan_dist.checkpoint.reading import newest_complete, verify
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.model.networks import build_models

CONFIG_FILE = "config.json"
NETWORK_FILES = {"encoder": "encoder.safetensors", "decoder": "decoder.safetensors"}  # checkpoints, old exports
MODEL_FILE = "model.safetensors"  # exports: both networks, keys prefixed with "encoder." and "decoder."
CARD_FILE = "README.md"
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# What builds the encoder and decoder and says what images they take: an export's config.json holds these alone.
PORTABLE_SETTINGS = ("architecture", "latent_dim", "hidden_dim", "depth", "conv_width", "encoder_batch_norm", "dropout",
                     "encoder_dropout", "decoder_dropout", "dataset", "image_size", "channels")


class ExportError(RuntimeError):
    """A directory that does not hold loadable networks. The message names the file and what to do."""


def warn_line(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def is_checkpoint(directory: Path) -> bool:
    """A checkpoint (or one half-written, or copied without its marker), as opposed to an export."""
    return any((directory / name).exists() for name in (MARKER, "state.json", "optimizers.safetensors"))


def network_directory(directory: str | Path, report: Callable[[str], None] = warn_line) -> Path:
    """The directory itself, verified when it is a checkpoint, or for a run's output directory its newest intact
    checkpoint (each newer one that fails verification is reported, in one line each)."""
    directory = Path(directory)
    if directory.is_symlink():  # checkpoints/best, checkpoints/last_good: the checkpoint by its own name
        directory = directory.resolve()
    if ((directory / NETWORK_FILES["decoder"]).exists() or (directory / MODEL_FILE).exists()
            or not checkpoints_dir(directory).is_dir()):
        if is_checkpoint(directory) and (problem := verify(directory)):
            raise ExportError(f"{directory} is not a usable checkpoint: {problem}. Name another checkpoint, or the "
                              "run's output directory for its newest intact one")
        return directory
    newest = newest_complete(checkpoints_dir(directory), report=report)
    if newest is None:
        raise ExportError(f"{directory} is an output directory without a complete checkpoint: train longer, or "
                          "pass a checkpoint or export directory")
    return newest


def load_networks(directory: str | Path, device: torch.device | str = "cpu",
                  weights: str = "ema") -> tuple[TrainConfig, nn.Module, nn.Module]:
    """(config, encoder, decoder) from an export or checkpoint directory, or a run's output directory (its newest
    intact checkpoint), in float32 and eval mode on device. weights "ema" reads the moving averages where the
    directory has them, "raw" the trained networks."""
    return read_networks(network_directory(directory), device, weights)


def read_networks(directory: Path, device: torch.device | str = "cpu",
                  weights: str = "ema") -> tuple[TrainConfig, nn.Module, nn.Module]:
    """load_networks from the directory network_directory gave (verified already)."""
    if weights not in WEIGHTS:
        raise ExportError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    averaged = {name: f"{AVERAGE_FILES[name]}.safetensors" for name in averages_in(directory, weights)}
    files = {**NETWORK_FILES, **averaged}
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{directory} holds no {CONFIG_FILE}: pass a checkpoint or export directory "
                          "(one with config.json and model.safetensors, or encoder.safetensors and "
                          "decoder.safetensors)")
    try:
        values = json.loads(config_path.read_text())
        config = saved_config({k: v for k, v in values.items() if not k.startswith("_")}, source=str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ExportError(f"{config_path} is not a usable config ({err}): restore it from the run's "
                          "output directory") from None
    with torch.device("meta"):  # no random initialisation: loading draws nothing from the global RNG
        encoder, decoder, _ = build_models(config)
    combined = (directory / MODEL_FILE).is_file()
    for name, network in (("encoder", encoder), ("decoder", decoder)):
        path = directory / (MODEL_FILE if combined else files[name])
        try:
            state = {key: t.to(device, torch.float32 if t.is_floating_point() else t.dtype)  # BN's counts stay ints
                     for key, t in load_file(path).items()}
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


def portable_settings(config: TrainConfig) -> dict[str, object]:
    return {key: getattr(config, key) for key in PORTABLE_SETTINGS}


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype of the floating-point weights in a directory load_networks reads."""
    path = directory / MODEL_FILE if (directory / MODEL_FILE).is_file() else directory / NETWORK_FILES["decoder"]
    with safe_open(path, framework="pt") as tensors:
        dtypes = (tensors.get_slice(key).get_dtype() for key in tensors.keys())  # noqa: SIM118 (safe_open is no dict)
        return getattr(torch, SAFETENSORS_DTYPES[next(d for d in dtypes if d in SAFETENSORS_DTYPES)])


def averages_in(directory: Path, weights: str) -> list[str]:
    """The networks whose moving averages a reader with these weights takes from directory."""
    return [name for name, file in AVERAGE_FILES.items()
            if weights == "ema" and (directory / f"{file}.safetensors").is_file()]


def averages_note(names: list[str]) -> str:
    """' (the moving averages of the encoder and the decoder)', or of one of them, or nothing."""
    return f" (the moving average{'s' * (len(names) > 1)} of the {' and the '.join(names)})" if names else ""
