"""The encoder and decoder as plain files: `config.json` (TrainConfig.to_dict()), `encoder.safetensors` and
`decoder.safetensors` (the state_dict keys of the unwrapped modules). Checkpoint directories hold the same
three files, so everything that reads networks reads either.

Only torch, safetensors and json are involved, never pickle. The decoder is simple enough to run without
this package; the README's script does that with torch and safetensors alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.models import Decoder, Encoder, build_models

CONFIG_FILE = "config.json"
NETWORK_FILES = {"encoder": "encoder.safetensors", "decoder": "decoder.safetensors"}


class ExportError(RuntimeError):
    """A directory that does not hold loadable networks. The message names the file and what to do."""


def export_networks(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, directory: str | Path,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Writes config.json, encoder.safetensors and decoder.safetensors (weights cast to dtype) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    for name, network in (("encoder", encoder), ("decoder", decoder)):
        state = {key: t.detach().to("cpu", dtype).contiguous() for key, t in network.state_dict().items()}
        save_file(state, directory / NETWORK_FILES[name], metadata={"format": "pt"})
    return directory


def load_networks(directory: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, Encoder, Decoder]:
    """(config, encoder, decoder) from an export or checkpoint directory, in float32 and eval mode on device."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{directory} holds no {CONFIG_FILE}: pass a checkpoint or export directory "
                          "(one with config.json, encoder.safetensors and decoder.safetensors)")
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
    except (json.JSONDecodeError, ConfigError) as err:
        raise ExportError(f"{config_path} is not a usable config ({err}): restore it from the run's "
                          "output directory") from None
    with torch.device("meta"):  # no random initialisation: loading draws nothing from the global RNG
        encoder, decoder, _ = build_models(config)
    for name, network in (("encoder", encoder), ("decoder", decoder)):
        path = directory / NETWORK_FILES[name]
        try:
            state = {key: t.to(device, torch.float32) for key, t in load_file(path).items()}
            network.load_state_dict(state, assign=True)
        except (OSError, SafetensorError, RuntimeError) as err:
            reason = " ".join(" ".join(str(err).strip().splitlines()[:2]).split())  # torch's first mismatch
            raise ExportError(f"cannot load the {name} from {path} ({reason}): it is missing, damaged, or "
                              f"does not match {CONFIG_FILE}") from None
    return config, encoder.eval(), decoder.eval()
