#!/usr/bin/env bash
# One trial of a W&B sweep: the command of launch/sweep.yaml, which `wandb agent` runs from the repository root
# with the trial's settings as flags (--lr=0.0003 --ema_decay=0.999 ...) and its W&B run's id in WANDB_RUN_ID.
#
# The trial trains with launch/local.sh (every GPU of this machine, else CPU processes) and writes to
# $SWEEP_RUNS_DIR/<run id>, resuming the checkpoint there if any: a preempted trial (exit 75, marked
# "preempting" in W&B) is handed out again under the same run id, and continues where it stopped.
#
# Settings: SWEEP_RUNS_DIR in the environment (default runs/sweep), and launch/local.sh's.
SWEEP_RUNS_DIR="${SWEEP_RUNS_DIR:-runs/sweep}"

set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${WANDB_RUN_ID:-}" ]]; then
    echo "error: WANDB_RUN_ID is not set: start trials with wandb agent SWEEP_ID (see launch/sweep.yaml)" >&2
    exit 2
fi

flags=(--output-dir "$SWEEP_RUNS_DIR/$WANDB_RUN_ID" --resume auto)
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    flags+=(--requeue)  # under SLURM: after a preemption save, requeue this job (its array task)
fi
exec "$repo/launch/local.sh" "${flags[@]}" "$@"
