"""The batches an evaluation runs on every process, with a stop check before each: a stop signal ends an
evaluation within one batch, not at its end (SLURM's grace time is often 30 s; an evaluation can take longer)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import Tensor

StopCheck = Callable[[], bool]


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation: its scores are dropped and the run stops with a checkpoint."""


def batches(rows: Tensor, size: int, stop_requested: StopCheck | None = None) -> Iterator[Tensor]:
    """rows in batches of `size`, raising EvaluationStopped before one when stop_requested() says so.
    stop_requested may be a collective (every process agreeing on the stop): every process must then draw as many
    batches, which the equal shares of an evaluation give."""
    for part in rows.split(size):
        if stop_requested is not None and stop_requested():
            raise EvaluationStopped
        yield part
