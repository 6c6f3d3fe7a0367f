"""The settings of `accelerate launch` (its flags, or an `accelerate config` file) that this trainer cannot honour.

accelerate launch hands its settings to each training process as environment variables, which Accelerator()
reads: ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_MEGATRON_LM (distributed_type),
ACCELERATE_GRADIENT_ACCUMULATION_STEPS (DeepSpeed's gradient_accumulation_steps, or set by hand) and
ACCELERATE_DYNAMO_BACKEND (dynamo_config.dynamo_backend, --dynamo_backend). The trainer drives its three
networks' DDP gradients and optimizers itself (vaegan_dist.step) and compiles with its own --compile, so those
would be ignored or would break deep inside a step: train.py stops at once instead, with one line that names
the setting and what to do. Mixed precision (ACCELERATE_MIXED_PRECISION) is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SHARDING = (
    ("ACCELERATE_USE_FSDP", "FSDP (distributed_type: FSDP)"),
    ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed (distributed_type: DEEPSPEED)"),
    ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM (distributed_type: MEGATRON_LM)"),
)


def unsupported_launch_setting(environ: Mapping[str, str] = os.environ) -> str | None:
    """The first setting of the launcher that the trainer cannot honour, as a one-line error, or None."""
    for variable, setting in SHARDING:
        if environ.get(variable, "false").lower() in ("true", "1", "yes"):
            return (f"accelerate asks for {setting}, which this trainer cannot honour: it trains with plain DDP "
                    "(one process per GPU). Use distributed_type: MULTI_GPU in your accelerate config (or "
                    "`accelerate launch --multi_gpu`), or the repository's accelerate_config.yaml")
    steps = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip()
    if steps not in ("", "1", "auto"):
        return (f"accelerate asks for gradient accumulation over {steps} steps (ACCELERATE_GRADIENT_ACCUMULATION_"
                "STEPS), which this trainer cannot honour: it updates every step. Set gradient_accumulation_steps "
                "to 1 (or unset the variable) and raise --batch-size or --global-batch-size instead")
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip()
    if backend.lower() not in ("", "no"):
        return (f"accelerate asks for the dynamo backend {backend} (dynamo_config.dynamo_backend or "
                "--dynamo_backend), which this trainer does not take from accelerate: set dynamo_backend: 'NO' "
                "(or `accelerate launch --dynamo_backend no`) and pass --compile to train.py, its own torch.compile")
    return None


def is_main_launch_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this is the launch's first process, before Accelerate is set up (RANK, as torch's launchers set it;
    a single process without a launcher is the main one)."""
    return environ.get("RANK", "0") == "0"


def launcher_words(pid: int) -> list[str] | None:
    """The command line of process pid when it is a launcher (`accelerate launch`, `torchrun`, or the same run as
    `python -m`), else None; read from Linux's /proc (None elsewhere)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return None
    names = [Path(word).name for word in words[:3]]
    if ("accelerate" in names and "launch" in words) or "torchrun" in names or any(
            name in ("accelerate.commands.launch", "torch.distributed.run") for name in names):
        return words
    return None


def processes_not_started(num_processes: int, ppid: int | None = None) -> str | None:
    """A warning when the `accelerate launch` that started this process asked for more processes than run: without
    --multi_gpu (as with --cpu) it starts one, whatever --num_processes says."""
    words = launcher_words(ppid or os.getppid())
    if words is None or "torchrun" in words[0] or "torch.distributed.run" in words[:3]:
        return None
    asked = None
    for word, following in zip(words, [*words[1:], ""], strict=True):
        name, _, value = word.partition("=")
        if name in ("--num_processes", "--num-processes"):
            asked = value or following
    if not (asked and asked.isdigit() and int(asked) > num_processes):
        return None
    return (f"accelerate launch was asked for {asked} processes but started {num_processes}: it starts several only "
            f"with --multi_gpu (on CPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {asked} "
            "train.py)")
