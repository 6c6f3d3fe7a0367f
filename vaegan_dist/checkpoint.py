"""Checkpoints: the whole training state as safetensors and JSON, written atomically, verified on load.

Layout under <output_dir>/checkpoints/:

    step_0001000/
        config.json                 the resolved TrainConfig
        encoder.safetensors         the unwrapped networks' state_dicts (identical on every process)
        decoder.safetensors
        discriminator.safetensors
        encoder_ema.safetensors     the encoder's and the decoder's moving averages (runs with --ema-decay
        decoder_ema.safetensors     only; checkpoints of version 0.2 hold the decoder's alone)
        optimizers.safetensors      the three Adam states, keys "<network>.<param index>.<name>"
        state.json                  position (step, epoch, images seen in the epoch), world size,
                                    loss-scaler state, W&B run id, every process's weight digest
        rank_<r>.safetensors        process r's RNG states and its open metrics window
        COMPLETE                    the SHA-256 of every file above; written last
    latest                          one line: the name of the newest complete checkpoint

No pickle anywhere: loading runs neither `pickle` nor `torch.load`, only safetensors and `json`.

A save writes into `.tmp-<name>/`, fsyncs every file, writes COMPLETE, renames the directory into place,
then moves `latest` and prunes. Every process writes its own rank file, and all processes agree on the
outcome after each phase: a failure on one process is a CheckpointError with its reason on all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load, load_file, save
from torch import Tensor, nn

from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.models import Autoencoder, Networks, build_models
from vaegan_dist.training_log import MetricWindow

# The moving averages' files, in runs that keep them (--ema-decay)
AVERAGE_FILES = {name: f"{name}_ema" for name in Autoencoder._fields}
MARKER = "COMPLETE"
LATEST = "latest"
NAME_PATTERN = re.compile(r"^step_(\d+)$")
# Settings that shape the networks' parameters or the data order: a resume that changes them is an error.
# (spectral_norm: the discriminator's weights become parametrizations, with power-iteration vectors.)
ARCHITECTURE_KEYS = ("latent_dim", "hidden_dim", "depth", "seed", "spectral_norm")
# Settings that say how to run, not what to train: they change on resume without comment.
RUN_KEYS = ("resume", "output_dir", "data_dir", "max_steps", "save_every", "keep_last", "keep_every",
            "log_every", "requeue", "cpu_threads", "mixed_precision", "on_save_error", "max_consecutive_skips",
            "compile")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or used. The message names the checkpoint and the fix."""


@dataclass(frozen=True)
class Position:
    """Where training stands: global steps done, and the epoch with the images of it already consumed."""

    step: int = 0
    epoch: int = 0
    images_seen: int = 0


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights and the optimizers' moments: where training stands, what it
    has logged so far, and this process's random streams (restored on resume only, never read while training).

    Written as the `state.json` keys position, skipped_steps, wandb_run_id and scaler, and per process as
    rank_<r>.safetensors (the RNG states and the open metrics window).
    """

    position: Position
    window: MetricWindow
    skipped_steps: int = 0
    wandb_run_id: str | None = None

    def to_checkpoint(self, scaler: torch.amp.GradScaler | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(the state.json entries, this process's tensors)."""
        state = {"position": dataclasses.asdict(self.position), "skipped_steps": self.skipped_steps,
                 "wandb_run_id": self.wandb_run_id, "scaler": scaler.state_dict() if scaler is not None else None}
        rng = {"rng.torch": torch.get_rng_state()}
        if self.window.terms.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.window.terms.device)
        return state, {**rng, **self.window.to_tensors()}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, scaler: torch.amp.GradScaler | None, window: MetricWindow,
                        rank: int | None) -> TrainState:
        """The checkpoint's state, with its scaler's state loaded into `scaler`. With `rank`, that process's RNG
        states become the global generators' and its open window is loaded into `window`; without (a resume on
        another number of processes), both stay as they are."""
        state = checkpoint.state
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if rank is not None:
            tensors = checkpoint.rank_tensors(rank)
            torch.set_rng_state(tensors["rng.torch"])
            if window.terms.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], window.terms.device)
            window.load_tensors(tensors)
        return cls(Position(**state["position"]), window, state["skipped_steps"], state.get("wandb_run_id"))


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------- writing

def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def named_modules(networks: Networks, averages: Autoencoder | None) -> dict[str, nn.Module]:
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
        for key, tensor in _cpu_state(module).items():
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def optimizer_tensors(optimizers: Networks) -> dict[str, Tensor]:
    """The per-parameter state of each optimizer as flat tensors, keyed "<network>.<param index>.<name>"."""
    flat = {}
    for network, optimizer in optimizers._asdict().items():
        for index, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                flat[f"{network}.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return flat


def load_optimizer_tensors(optimizers: Networks, flat: Mapping[str, Tensor]) -> None:
    """Restores optimizer_tensors' output. Hyper-parameters (lr, betas) stay as the optimizers have them now."""
    for network, optimizer in optimizers._asdict().items():
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in flat.items():
            owner, index, name = key.split(".")
            if owner == network:
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _agree(accelerator: Accelerator, error: str | None, what: str) -> None:
    """Every process learns every process's error from one phase; any error raises on all of them."""
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    failed = [f"process {rank}: {e}" for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})")


def _attempt(action: Callable[[], None]) -> str | None:
    try:
        action()
    except Exception as err:  # reported on every process by _agree, so no process is left waiting
        return f"{type(err).__name__}: {err}"
    return None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    config: TrainConfig,
    networks: Networks,
    optimizers: Networks,
    state: TrainState,
    averages: Autoencoder | None = None,
) -> Path:
    """Writes checkpoint step_<state.position.step> on every process together; returns its directory.

    networks: the unwrapped modules; optimizers: the plain torch optimizers. Raises CheckpointError on all
    processes if any of them fails, leaving the previous checkpoints and `latest` untouched.
    """
    root = checkpoints_dir(output_dir)
    position = state.position
    name = checkpoint_name(position.step)
    modules = named_modules(networks, averages)
    state_entries, rank_tensors = state.to_checkpoint(accelerator.scaler)
    final, tmp = root / name, root / f".tmp-{name}"
    main, rank = accelerator.is_main_process, accelerator.process_index

    def prepare_dir() -> None:
        if main:
            for stale in root.glob(".tmp-*"):  # left behind by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)

    if not_finite := non_finite_modules(modules):
        raise CheckpointError(f"the weights of {', '.join(not_finite)} at step {position.step} are not finite: not "
                              "saved; resume from the previous checkpoint with a lower --lr")
    _agree(accelerator, _attempt(prepare_dir), f"creating checkpoint {tmp}")
    digests = gather_object([weights_digest(modules)]) if accelerator.num_processes > 1 else [
        weights_digest(modules)]
    if len(set(digests)) != 1:
        raise CheckpointError(f"the processes hold different weights at step {position.step} (digests "
                              f"{digests}): the replicas diverged; resume from the previous checkpoint")

    def write_files() -> None:
        _fsync_write(tmp / f"rank_{rank}.safetensors", save(rank_tensors))
        if main:
            for file, module in modules.items():
                _fsync_write(tmp / f"{file}.safetensors", save(_cpu_state(module)))
            _fsync_write(tmp / "optimizers.safetensors", save(optimizer_tensors(optimizers)))
            full_state = {**state_entries, "world_size": accelerator.num_processes, "replica_digests": digests}
            _fsync_write(tmp / "state.json", (json.dumps(full_state, indent=2) + "\n").encode())
            _fsync_write(tmp / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())

    _agree(accelerator, _attempt(write_files), f"writing checkpoint {tmp}")

    _agree(accelerator, _attempt(lambda: _publish(tmp, final, config) if main else None),
           f"publishing checkpoint {final}")
    return final


def _publish(tmp: Path, final: Path, config: TrainConfig) -> None:
    """Seals the written checkpoint (its COMPLETE marker), moves it into place and `latest` to it, then prunes."""
    root = final.parent
    hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    _fsync_write(tmp / MARKER, (json.dumps({"sha256": hashes}, indent=2) + "\n").encode())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _fsync_write(root / f"{LATEST}.tmp", f"{final.name}\n".encode())
    os.replace(root / f"{LATEST}.tmp", root / LATEST)
    _fsync_dir(root)
    prune(root, config.keep_last, config.keep_every)


def prune(root: Path, keep_last: int, keep_every: int | None) -> None:
    """Deletes complete checkpoints beyond the newest keep_last, except those at multiples of keep_every."""
    complete = [path for step, path in _numbered(root) if (path / MARKER).is_file()]
    for path in complete[:-keep_last]:
        step = int(NAME_PATTERN.match(path.name).group(1))
        if keep_every is None or step % keep_every:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading

def _numbered(root: Path) -> list[tuple[int, Path]]:
    """The step_* directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def verify(path: Path) -> str | None:
    """None if `path` is a complete, intact checkpoint; otherwise what is wrong with it."""
    marker = path / MARKER
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a directory"
    if not marker.is_file():
        return f"it has no {MARKER} marker (an interrupted save, or not a checkpoint)"
    try:
        hashes = json.loads(marker.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} marker is unreadable"
    required = {f"{n}.safetensors" for n in (*Networks._fields, "optimizers")} | {"state.json", "config.json"}
    if missing := sorted(required - set(hashes)):
        return f"its {MARKER} marker does not list {', '.join(missing)}"
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != expected:
            return f"{name} does not match its SHA-256 (truncated or damaged)"
    return check_contents(path)


def newest_complete(root: Path, report: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint under root; each newer damaged one is reported in one line and skipped."""
    for _, path in reversed(_numbered(root)):
        problem = verify(path)
        if problem is None:
            return path
        report(f"skipping checkpoint {path}: {problem}; trying the previous one")
    return None


def resolve_resume(resume: str, output_dir: str | Path, report: Callable[[str], None]) -> Path | None:
    """The checkpoint `--resume` names, or None to start fresh.

    auto: the output directory's newest intact checkpoint, if any; latest: the same, but one must exist;
    none: start fresh; a PATH: that checkpoint (or an output directory's newest), which must be intact.
    """
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        found = newest_complete(checkpoints_dir(output_dir), report)
        if found is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no complete checkpoint in {checkpoints_dir(output_dir)}; "
                                  "use --resume auto to start fresh when there is none")
        return found
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such file or directory; give a checkpoint directory "
                              f"(…/checkpoints/step_NNNNNNN) or an output directory")
    if not (path / MARKER).exists() and (checkpoints_dir(path).is_dir() or path.name == "checkpoints"):
        root = path if path.name == "checkpoints" else checkpoints_dir(path)
        found = newest_complete(root, report)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint in {root}")
        return found
    if problem := verify(path):
        raise CheckpointError(f"--resume {resume}: not a usable checkpoint: {problem}. Name another "
                              f"checkpoint, or use --resume auto to take the newest intact one")
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint directory, read lazily."""

    path: Path

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def network(self, name: str) -> dict[str, Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def has_network(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def load_networks(self, networks: Networks, averages: Autoencoder | None) -> None:
        """Loads the saved weights into the networks, and into averages when given: each saved average, or the
        saved network where the checkpoint has no average of it (a run that starts keeping one there)."""
        for name, module in networks._asdict().items():
            module.load_state_dict(self.network(name))
        for name, average in (averages._asdict() if averages is not None else {}).items():
            file = AVERAGE_FILES[name]
            average.load_state_dict(self.network(file if self.has_network(file) else name))

    def optimizers(self) -> dict[str, Tensor]:
        return load_file(self.path / "optimizers.safetensors")

    def rank_tensors(self, rank: int) -> dict[str, Tensor]:
        return load((self.path / f"rank_{rank}.safetensors").read_bytes())


def config_changes(saved: Mapping[str, Any], config: TrainConfig) -> Iterator[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each training setting the new run changes. Raises CheckpointError
    for a change the checkpoint cannot follow (the network shapes, the data order)."""
    new = config.to_dict()
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != new[key]:
            flag = f"--{key.replace('_', '-')}"
            if isinstance(saved[key], bool):
                flag = flag if saved[key] else f"--no-{flag[2:]}"
            else:
                flag = f"{flag} {saved[key]}"
            raise CheckpointError(f"setting {key!r} is {new[key]!r} but the checkpoint was trained with "
                                  f"{saved[key]!r}: resume with {flag}, or "
                                  "start a new run in another --output-dir (or with --resume none)")
    for key, value in new.items():
        if key not in ARCHITECTURE_KEYS and key not in RUN_KEYS and key in saved and saved[key] != value:
            yield key, saved[key], value


# ------------------------------------------------------------------------------------ contents, on load

NUM_TRAINING_IMAGES = 60_000  # MNIST's training set: an epoch's position never passes it
OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


def check_contents(path: Path) -> str | None:
    """None if what a resumed run relies on makes sense; otherwise what does not, in a few words.

    The SHA-256 marker proves the files were written whole, not that they are right. This checks state.json's keys
    and their types, the position (not negative, its step the directory's, within an epoch), the networks' and the
    moving average's tensors (the keys, shapes and dtypes that config.json's networks have; finite), the Adam states
    (one pair of moments of each parameter's shape and a step count per parameter; finite), each process's rank file,
    and that the weights hash to the replicas' digests recorded at the save.
    """
    try:
        return _contents_problem(path)
    except Exception as err:  # a file that reads but does not parse as what it should be
        return f"its contents cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"


def _contents_problem(path: Path) -> str | None:
    state = json.loads((path / "state.json").read_text())
    if problem := _state_problem(state, path.name):
        return problem
    try:
        config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()), source="config.json")
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
    for key, kinds in (("wandb_run_id", (str, type(None))), ("scaler", (dict, type(None)))):
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
    if position["images_seen"] > NUM_TRAINING_IMAGES or position["epoch"] > position["step"]:
        return f"state.json's position {position!r} is inconsistent (more images than an epoch, or epochs than steps)"
    if not 0 <= state["skipped_steps"] <= position["step"] or state["world_size"] < 1:
        return f"state.json's skipped_steps {state['skipped_steps']} or world_size {state['world_size']} is impossible"
    digests = state["replica_digests"]
    if len(digests) != state["world_size"] or len(set(digests)) != 1:
        return f"state.json's replica_digests do not agree ({len(set(digests))} distinct for {state['world_size']})"
    return None


def _weights_problem(path: Path, config: TrainConfig, shapes: Networks, digest: str) -> str | None:
    """What is wrong with the networks' (and the average's) tensors: keys, shapes, dtypes, finiteness, and their
    hash against the replicas' digest."""
    averaged = {file: name for name, file in AVERAGE_FILES.items() if (path / f"{file}.safetensors").is_file()}
    loaded = {}
    for name in [*Networks._fields, *averaged]:
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


def _optimizers_problem(path: Path, shapes: Networks) -> str | None:
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
