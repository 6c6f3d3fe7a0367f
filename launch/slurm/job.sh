# shellcheck shell=bash
# What both sbatch scripts do before they start training: the job's output directory and its W&B identity.
# Sourced from the repository root; it sets JOB_TRAIN_FLAGS, the flags every node passes to train.py.
#
# Settings: set them in the environment of `sbatch` (RUNS_DIR=... sbatch ...) or edit the defaults here.
RUNS_DIR="${RUNS_DIR:-runs}"  # each job writes to $RUNS_DIR/<job name>-<job id>

# Your cluster's environment: load its modules and activate the Python environment that has vaegan-dist here
# (every node runs this file before it trains), for example:
#   module load cuda/12.4
#   source "$HOME/venvs/vaegan/bin/activate"

: "${SLURM_JOB_ID:?submit this script with sbatch}"
job="$SLURM_JOB_NAME-$SLURM_JOB_ID"

# A requeued job keeps its id: it finds its own checkpoints (--resume auto) and continues its own W&B run
# (the run id is the job's until the first checkpoint stores it), grouped under the job's name.
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$SLURM_JOB_NAME}"
export WANDB_RUN_ID="${WANDB_RUN_ID:-slurm-${SLURM_CLUSTER_NAME:-cluster}-$SLURM_JOB_ID}"
export WANDB_RESUME="${WANDB_RESUME:-allow}"

# --requeue: after SIGUSR1 (the time limit is near) or SIGTERM (preemption), the training processes save a
# checkpoint and the main one runs `scontrol requeue $SLURM_JOB_ID`.
# shellcheck disable=SC2034  # used by the scripts that source this file
JOB_TRAIN_FLAGS=(--output-dir "$RUNS_DIR/$job" --resume auto --requeue)
echo "job $job on $SLURM_JOB_NODELIST: outputs in $RUNS_DIR/$job"
