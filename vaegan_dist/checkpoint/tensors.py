"""The tensors a checkpoint holds, as flat dicts of CPU tensors: the networks' weights, their digest, the Adam
states."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vaegan_dist.model.networks import Autoencoder, PerNetwork

# The moving averages' files, in runs that keep them (--ema-decay)
AVERAGE_FILES = {name: f"{name}_ema" for name in Autoencoder._fields}


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def named_modules(networks: PerNetwork, averages: Autoencoder | None) -> dict[str, nn.Module]:
    """The modules a checkpoint holds, by file name."""
    kept = averages._asdict() if averages is not None else {}
    return {**networks._asdict(), **{AVERAGE_FILES[name]: module for name, module in kept.items()}}


def non_finite_modules(modules: Mapping[str, nn.Module]) -> list[str]:
    """The names of the modules holding a NaN or an infinity: a checkpoint never stores them."""
    return [name for name, module in modules.items()
            if not all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())]


def weights_digest(networks: Mapping[str, nn.Module]) -> str:
    """SHA-256 over every weight of the networks: equal on all processes iff their replicas are identical."""
    digest = hashlib.sha256()
    for name, module in networks.items():
        for key, tensor in cpu_state(module).items():
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def optimizer_tensors(optimizers: PerNetwork) -> dict[str, Tensor]:
    """The per-parameter state of each optimizer as flat tensors, keyed "<network>.<param index>.<name>"."""
    flat = {}
    for network, optimizer in optimizers._asdict().items():
        for index, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                flat[f"{network}.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return flat


def load_optimizer_tensors(optimizers: PerNetwork, flat: Mapping[str, Tensor]) -> None:
    """Restores optimizer_tensors' output. Hyper-parameters (lr, betas) stay as the optimizers have them now."""
    for network, optimizer in optimizers._asdict().items():
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in flat.items():
            owner, index, name = key.split(".")
            if owner == network:
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
