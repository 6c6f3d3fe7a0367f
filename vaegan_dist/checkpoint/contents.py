"""What a checkpoint's files hold, checked on load: the SHA-256 marker proves the files were written whole, not that
they are right."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file
from torch import Tensor

from vaegan_dist.checkpoint.layout import NAME_PATTERN
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES, weights_digest
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.model.networks import PerNetwork, build_models

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


def check_contents(path: Path) -> str | None:
    """None if what a resumed run relies on makes sense; otherwise what does not, in a few words.

    The SHA-256 marker proves the files were written whole, not that they are right. This checks state.json's keys
    and their types, the position (not negative, its step the directory's), the networks' and the
    moving average's tensors (the keys, shapes and dtypes that config.json's networks have; finite), the Adam states
    (one pair of moments of each parameter's shape and a step count per parameter; finite), each process's rank file,
    and that the weights hash to the replicas' digests recorded at the save.
    """
    try:
        return _contents_problem(path)
    except Exception as err:  # a file that reads but does not parse as what it should be
        return f"its contents cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"


def saved_config(values: dict[str, Any], source: str = "config.json") -> TrainConfig:
    """The TrainConfig of a config.json that a run or an export wrote, by any version: a setting it predates takes
    the value that version had (0.6.0's conv encoder had batch norm), where the default would build other
    networks."""
    if values.get("architecture") == "conv" and "encoder_batch_norm" not in values:
        values = {**values, "encoder_batch_norm": True}
    return TrainConfig.from_dict(values, source=source)


def _contents_problem(path: Path) -> str | None:
    state = json.loads((path / "state.json").read_text())
    if problem := _state_problem(state, path.name):
        return problem
    try:
        config = saved_config(json.loads((path / "config.json").read_text()))
    except ConfigError as err:
        return f"its config.json is not usable ({err})"
    with torch.device("meta"):  # shapes only: nothing is initialised, nothing drawn from the global RNG
        shapes = build_models(config)
    return (_weights_problem(path, config, shapes, state["replica_digests"][0])
            or _optimizers_problem(path, shapes) or _rank_files_problem(path, state["world_size"]))


def _state_problem(state: Any, directory: str) -> str | None:
    """What is wrong with state.json's keys, their types and the position, if anything."""
    if not isinstance(state, dict):
        return "state.json is not a JSON object"
    expected_types = {"position": dict, "skipped_steps": int, "world_size": int, "replica_digests": list}
    for key, kind in expected_types.items():
        if key not in state:
            return f"state.json has no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"state.json's {key!r} is {state[key]!r}, not {kind.__name__}"
    for key, kinds in (("wandb_run_id", (str, type(None))), ("scaler", (dict, type(None))),
                       ("best", (dict, type(None))), ("branch_from", (str, type(None)))):
        if not isinstance(state.get(key), kinds):
            return f"state.json's {key!r} is {state[key]!r}"
    position = state["position"]
    if set(position) != {"step", "epoch", "images_seen"}:
        return f"state.json's position {position!r} is not step, epoch and images_seen"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position.values()):
        return f"state.json's position {position!r} is not three counts >= 0"
    match = NAME_PATTERN.match(directory)
    if match and int(match.group(1)) != position["step"]:
        return f"state.json's step {position['step']} is not the directory's ({directory})"
    if position["epoch"] > position["step"]:
        return f"state.json's position {position!r} is inconsistent (more epochs than steps)"
    if not 0 <= state["skipped_steps"] <= position["step"] or state["world_size"] < 1:
        return f"state.json's skipped_steps {state['skipped_steps']} or world_size {state['world_size']} is impossible"
    digests = state["replica_digests"]
    if len(digests) != state["world_size"] or len(set(digests)) != 1:
        return f"state.json's replica_digests do not agree ({len(set(digests))} distinct for {state['world_size']})"
    return None


def _weights_problem(path: Path, config: TrainConfig, shapes: PerNetwork, digest: str) -> str | None:
    """What is wrong with the networks' (and the average's) tensors: keys, shapes, dtypes, finiteness, and their
    hash against the replicas' digest."""
    averaged = {file: name for name, file in AVERAGE_FILES.items() if (path / f"{file}.safetensors").is_file()}
    loaded = {}
    for name in [*PerNetwork._fields, *averaged]:
        network = averaged.get(name, name)
        tensors = load_file(path / f"{name}.safetensors")
        if problem := _tensors_problem(f"{name}.safetensors", tensors, getattr(shapes, network).state_dict()):
            return problem
        with torch.device("meta"):
            loaded[name] = getattr(build_models(config), network)
        loaded[name].load_state_dict(tensors, assign=True)
    if weights_digest(loaded) != digest:
        return "its weights do not hash to the replicas' digests recorded at the save"
    return None


def _optimizers_problem(path: Path, shapes: PerNetwork) -> str | None:
    """What is wrong with the Adam states: one pair of moments of each parameter's shape and a step count each."""
    flat = load_file(path / "optimizers.safetensors")
    expected = {}
    for network, module in shapes._asdict().items():
        for index, parameter in enumerate(module.parameters()):
            for moment in OPTIMIZER_MOMENTS:
                expected[f"{network}.{index}.{moment}"] = parameter
            expected[f"{network}.{index}.step"] = torch.empty((), device="meta")
    if flat and (problem := _tensors_problem("optimizers.safetensors", flat, expected)):
        return problem
    if any((t < 0).any() for k, t in flat.items() if not k.endswith(".exp_avg")):
        return "optimizers.safetensors holds a negative step count or second moment"
    return None


def _rank_files_problem(path: Path, world_size: int) -> str | None:
    """What is wrong with the processes' rank files: each present, with an RNG state and a metrics window."""
    window = {"window.terms": 1, "window.norms": 1, "window.steps": 1}  # vectors (an older version had fewer terms)
    for rank in range(world_size):
        file = path / f"rank_{rank}.safetensors"
        if not file.is_file():
            return f"rank_{rank}.safetensors is missing (written by {world_size} processes)"
        tensors = load(file.read_bytes())
        if "rng.torch" not in tensors or tensors["rng.torch"].dtype != torch.uint8:
            return f"rank_{rank}.safetensors has no torch RNG state"
        for key, dims in window.items():
            if key not in tensors or tensors[key].dim() != dims:
                return f"rank_{rank}.safetensors's {key} is missing or of the wrong shape"
    return None


def _tensors_problem(file: str, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    """What is wrong with tensors against expected's keys, shapes and dtypes; non-finite values too."""
    if missing := sorted(set(expected) - set(tensors)):
        return f"{file} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra := sorted(set(tensors) - set(expected)):
        return f"{file} has {extra[0]}, which the networks of config.json do not"
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"{file}'s {key} is {got.dtype} {tuple(got.shape)}, the networks need {want.dtype} "
                    f"{tuple(want.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"{file}'s {key} is not finite"
    return None
