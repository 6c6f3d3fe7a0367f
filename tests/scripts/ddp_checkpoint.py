"""Run under `accelerate launch` with 2 CPU processes by tests/test_preemption.py.

Saves one good checkpoint, then one during which process 1 runs out of disk space while writing its rank
file. Each process writes what it saw of the failed save to <out>/rank<r>.txt.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import vaegan_dist.checkpoint.writing as checkpoint_module
from tests.conftest import tiny_config
from vaegan_dist.checkpoint.layout import CheckpointError
from vaegan_dist.checkpoint.writing import save_checkpoint
from vaegan_dist.exits import leave
from vaegan_dist.model.networks import build_models
from vaegan_dist.training.metrics import MetricWindow
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import adam_optimizers


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    config = tiny_config(output_dir=out_dir)
    torch.manual_seed(0)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)

    def save(step: int) -> Path:
        state = TrainState(Position(step), MetricWindow(accelerator.device))
        return save_checkpoint(accelerator, out_dir, config, networks, optimizers, state)

    save(1)
    if accelerator.process_index == 1:
        def disk_full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        checkpoint_module._fsync_write = disk_full
    try:
        save(2)
        outcome = "saved"
    except CheckpointError as err:
        outcome = str(err)
    (Path(out_dir) / f"rank{accelerator.process_index}.txt").write_text(outcome)
    print(f"process {accelerator.process_index} leaves")  # buffered (stdout is a pipe): leave() flushes it
    accelerator.wait_for_everyone()
    leave(0)  # as train.py ends: the process group destroyed, then os._exit


if __name__ == "__main__":
    main(sys.argv[1])
