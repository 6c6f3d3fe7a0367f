#!/usr/bin/env bash
# Train on this machine: one process per GPU, or CPU processes over gloo when there is no GPU.
#
#   launch/local.sh [train.py flags]          e.g.  launch/local.sh --max-steps 200
#
# Settings: set them in the environment (NUM_PROCESSES=2 launch/local.sh) or edit the defaults here.
NUM_PROCESSES="${NUM_PROCESSES:-}"           # processes to start; default: one per GPU, else CPU_PROCESSES
CPU_PROCESSES="${CPU_PROCESSES:-2}"          # processes on a machine without a GPU
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-0}"  # the processes' rendezvous port; 0: any free port

set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The GPUs torch sees: under SLURM, those of the allocation (CUDA_VISIBLE_DEVICES).
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if (( gpus > 0 )); then
    launcher=(--config_file "$repo/accelerate_config.yaml" --num_processes "${NUM_PROCESSES:-$gpus}")
else
    processes="${NUM_PROCESSES:-$CPU_PROCESSES}"
    export ACCELERATE_USE_CPU=1
    launcher=(--num_processes "$processes" --mixed_precision no)
    if (( processes > 1 )); then
        launcher+=(--multi_gpu)  # `--cpu` would start one process, whatever --num_processes says
    fi
fi

# SLURM's --signal sends SIGUSR1 to every process of the job step, this one included. accelerate launch (torch's
# elastic agent) has no handler for it and would die at once, and SLURM would then kill the training processes
# in the middle of their checkpoint. So the agent ignores SIGUSR1; the training processes install their own
# handler, save, and exit, and the agent exits after them.
trap '' USR1
exec accelerate launch "${launcher[@]}" --main_process_port "$MAIN_PROCESS_PORT" --dynamo_backend no \
    "$repo/train.py" "$@"
