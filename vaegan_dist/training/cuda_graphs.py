"""The launch-free step (--cuda-graphs): the whole training step captured once in a CUDA graph and replayed.

At batch 128 the seed networks' step is tens of microseconds of math on a recent GPU, but some 200 kernel
launches (one forward pass, three routed backward passes, three fused Adam updates): in eager mode the step is
bound by the CPU launching them. A CUDA graph replays all of them with one launch.

What is captured is train_step's own step_on_device, which reads nothing back from the device:
  noise       eps and z_p drawn inside the graph from the device's default CUDA generator (graph-safe: each
              replay reads the generator's seed and offset at replay time and advances the offset)
  forward     one pass (routed_gradients), from a static input buffer that each call copies the batch into
  backward    the three routed passes; the gradients live in the graph's private memory pool
  verdict     each network's gradient norm and whether all are finite, on the device: the optimizers'
              `found_inf`, 1 when any is not
  update      the three fused Adam steps, capturable, with their learning rates in device tensors (refilled
              only when the schedule changes them); the kernel skips a step whose `found_inf` is 1, as in eager.
The result (losses, gradient norms, stepped) is copied out of the graph's static outputs; reading `stepped`
synchronises once per step, as the eager step does.

Capture happens at the first call: a few warm-up steps on a side stream (their updates skipped through
`found_inf`, the networks' buffers, e.g. spectral norm's vectors, and the CUDA generator restored afterwards),
then the capture itself, which runs nothing. So the first replay draws the same noise and dropout masks as the
first eager step would, and the CUDA generator's state after N replays is the one that N eager steps leave:
checkpoints save it and a resumed run restores it before capturing again, so a stop and resume is bitwise the
unbroken run on the same machine.

Not supported, each a one-line error before anything runs (check_launch_free): a CPU, several processes (DDP's
gradient hooks and NCCL calls), fp16 (the GradScaler's scale changes between steps on the host), --compile
(torch.compile(mode="reduce-overhead") would capture each network's forward and backward separately, not the
three routed passes and the optimizers together). Every batch must have the same size (the loop's do).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.model.losses import LossTerms
from vaegan_dist.model.networks import PerNetwork
from vaegan_dist.training.step import StepResult, step_on_device

WARMUP_STEPS = 3


def check_launch_free(config: TrainConfig, accelerator: Any) -> None:
    """Raises ConfigError when --cuda-graphs cannot run here (the settings alone are checked by TrainConfig)."""
    if not config.cuda_graphs:
        return
    if accelerator.num_processes > 1:
        raise ConfigError(f"setting 'cuda_graphs' runs one process only, not {accelerator.num_processes}: drop "
                          "--cuda-graphs or launch a single process")
    if accelerator.device.type != "cuda":
        raise ConfigError(f"setting 'cuda_graphs' needs a CUDA GPU, and this run is on {accelerator.device.type}: "
                          "drop --cuda-graphs")


class GraphedStep:
    """train_step's equal, captured at its first call and replayed at every later one (see the module)."""

    def __init__(self, warmup_steps: int = WARMUP_STEPS) -> None:
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, networks: PerNetwork, optimizers: PerNetwork, x: Tensor, config: TrainConfig,
                 scaler: torch.amp.GradScaler | None = None) -> StepResult:
        if scaler is not None:
            raise ConfigError("setting 'cuda_graphs' does not support fp16's loss scaling: use --mixed-precision "
                              "bf16 or no")
        if self.graph is None:
            self.capture(networks, optimizers, x, config)
        elif x.shape != self.x.shape:
            raise ValueError(f"the captured step takes batches of shape {tuple(self.x.shape)}, not {tuple(x.shape)}")
        self.set_learning_rates(optimizers)
        self.x.copy_(x)
        self.graph.replay()
        out = self.out.clone()
        count = len(LossTerms.names())
        terms = LossTerms(*out[:count].unbind())
        stepped = bool(out[-1])
        return StepResult(terms, out[count:count + len(PerNetwork._fields)], stepped)

    def set_learning_rates(self, optimizers: PerNetwork) -> None:
        for index, optimizer in enumerate(optimizers):
            lr = float(optimizer.param_groups[0]["lr"])
            if lr != self.lr_values[index]:
                self.lrs[index].fill_(lr)
                self.lr_values[index] = lr

    def step(self, networks: PerNetwork, optimizers: PerNetwork, config: TrainConfig, skip: bool) -> None:
        """train_step's step_on_device on the static buffers; skip: compute everything but leave the weights."""
        terms, norms, finite = step_on_device(networks, optimizers, self.x, config, force_skip=skip)
        self.out.copy_(torch.cat([terms.stacked(), norms.float(), finite.float().reshape(1)]))

    def capture(self, networks: PerNetwork, optimizers: PerNetwork, x: Tensor, config: TrainConfig) -> None:
        device = x.device
        self.x = torch.empty_like(x)
        self.x.copy_(x)
        self.out = torch.zeros(len(LossTerms.names()) + len(PerNetwork._fields) + 1, device=device)
        self.lr_values = [float(opt.param_groups[0]["lr"]) for opt in optimizers]
        self.lrs = [torch.tensor(lr, dtype=torch.float32, device=device) for lr in self.lr_values]
        rng = torch.cuda.get_rng_state(device)
        buffers = [b.detach().clone() for net in networks for b in net.buffers()]
        for optimizer, lr in zip(optimizers, self.lrs, strict=True):
            optimizer.param_groups[0]["lr"] = lr
            optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up runs uncaptured on purpose
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    self.step(networks, optimizers, config, skip=True)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(networks, optimizers, config, skip=False)
            torch.cuda.synchronize(device)
        finally:
            for optimizer, lr in zip(optimizers, self.lr_values, strict=True):
                optimizer.param_groups[0]["lr"] = lr  # checkpoints keep plain numbers
        with torch.no_grad():
            for saved, buffer in zip(buffers, (b for net in networks for b in net.buffers()), strict=True):
                buffer.copy_(saved)
        torch.cuda.set_rng_state(rng, device)
        self.graph = graph
