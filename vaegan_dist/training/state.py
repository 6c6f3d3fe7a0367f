"""Where training stands, and what a checkpoint carries of it besides the weights and the optimizers' moments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vaegan_dist.checkpoint.reading import Checkpoint
from vaegan_dist.training.metrics import MetricWindow


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

    Written as the `state.json` keys position, skipped_steps, wandb_run_id, best, branch_from and scaler, and per
    process as
    rank_<r>.safetensors (the RNG states and the open metrics window).
    """

    position: Position
    window: MetricWindow
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    best: dict[str, float] | None = None  # --keep-best: the best evaluation so far, {"step": S, "value": v}
    branch_from: str | None = None  # the checkpoint a --resume PATH started this branch from (checkpoint/lineage)

    @property
    def step(self) -> int:
        return self.position.step

    def to_checkpoint(self, scaler: torch.amp.GradScaler | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(the state.json entries, this process's tensors)."""
        state = {"position": dataclasses.asdict(self.position), "skipped_steps": self.skipped_steps,
                 "wandb_run_id": self.wandb_run_id, "best": self.best, "branch_from": self.branch_from,
                 "scaler": scaler.state_dict() if scaler is not None else None}
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
        return cls(Position(**state["position"]), window, state["skipped_steps"], state.get("wandb_run_id"),
                   state.get("best"), state.get("branch_from"))
