"""Run under `accelerate launch` with 2 CPU processes by tests/test_evaluation.py: evaluate_distributed on the
networks of an export directory; the main process writes the scores as JSON, the other checks it got none."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from vaegan_dist.evaluation.scores import evaluate_distributed
from vaegan_dist.exits import leave
from vaegan_dist.hub.network_files import load_networks

NUM_SAMPLES = 203  # odd: the second process's share is padded


def main(directory: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    config, encoder, decoder = load_networks(directory, accelerator.device)
    scores = evaluate_distributed(accelerator, encoder, decoder, config, NUM_SAMPLES)
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(scores))
    else:
        assert scores == {}, scores
    accelerator.wait_for_everyone()
    leave(0)  # as train.py ends: the process group destroyed, then os._exit


if __name__ == "__main__":
    main(*sys.argv[1:])
