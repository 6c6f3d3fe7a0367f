"""Run under `accelerate launch` with 2 CPU processes by tests/test_distributed.py; writes one file per rank.

1. Each process takes its half of one batch and the matching halves of the noise: the averaged routed
   gradients and the weights after one step (to compare with one process on the whole batch).
2. k training steps with dropout, each process on its own data and noise: the weights (to compare replicas).
3. fp16 loss scaling where only rank 1's batch overflows: whether each process stepped, and its scale.
4. A NaN in rank 1's batch (fp32): whether each process stepped, then one good step, and the weights.
5. Part 1's half batches with --gradient-allreduce bf16 (train.py's Accelerator): the averaged gradients.
6. --gan-margin's rule on losses that differ between the processes: which networks rest.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from tests.conftest import tiny_config
from tests.test_step import losses_with, make_inputs
from vaegan_dist.exits import leave
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.setup import make_accelerator
from vaegan_dist.training.step import adam_optimizers, equilibrium_rests, routed_gradients, train_step

BATCH = 12  # the whole batch of part 1; each process takes half


def prepared(accelerator, config):
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    objects = accelerator.prepare(*networks, *optimizers)
    return objects[:3], [opt.optimizer for opt in objects[3:]]


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, half = accelerator.process_index, BATCH // 2
    results: dict[str, torch.Tensor] = {}

    config = tiny_config(dropout=0.0)
    set_seed(0)
    networks, optimizers = prepared(accelerator, config)
    x, eps, z_p = (t[rank * half:(rank + 1) * half] for t in make_inputs(config, dtype=torch.float32))
    grads = routed_gradients(*networks, x, eps, z_p, config)
    for name in PerNetwork._fields:
        for i, g in enumerate(grads[name]):
            results[f"grad.{name}.{i}"] = g.clone()
    for optimizer in optimizers:
        optimizer.step()
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        for i, p in enumerate(net.parameters()):
            results[f"step1.{name}.{i}"] = p.detach().clone()

    config = tiny_config(dropout=0.2)
    set_seed(0)
    networks, optimizers = prepared(accelerator, config)
    set_seed(0, device_specific=True)  # different dropout masks and noise on each process
    for _ in range(4):
        x = torch.rand(8, 784) * 2 - 1
        assert train_step(networks, optimizers, x, config).stepped
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        for i, p in enumerate(net.parameters()):
            results[f"replica.{name}.{i}"] = p.detach().clone()

    config = tiny_config(dropout=0.0)
    set_seed(0)
    networks, optimizers = prepared(accelerator, config)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.rand(8, 784) * 2 - 1
    overflow = train_step(networks, optimizers, x * (1e30 if rank == 1 else 1.0), config, scaler)
    results["fp16.stepped_on_overflow"] = torch.tensor(overflow.stepped)
    results["fp16.scale_after_overflow"] = torch.tensor(scaler.get_scale())
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        for i, p in enumerate(net.parameters()):
            results[f"fp16.{name}.{i}"] = p.detach().clone()
    results["fp16.stepped_after"] = torch.tensor(train_step(networks, optimizers, x, config, scaler).stepped)

    config = tiny_config(dropout=0.0)
    set_seed(0)
    networks, optimizers = prepared(accelerator, config)
    x = torch.rand(8, 784) * 2 - 1
    if rank == 1:
        x[0, 0] = float("nan")  # one bad pixel on one process, in fp32 without a scaler
    results["nan.stepped"] = torch.tensor(train_step(networks, optimizers, x, config).stepped)
    x[0, 0] = 0.0
    results["nan.stepped_after"] = torch.tensor(train_step(networks, optimizers, x, config).stepped)
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        for i, p in enumerate(net.parameters()):
            results[f"nan.{name}.{i}"] = p.detach().clone()

    config = tiny_config(dropout=0.0, gradient_allreduce="bf16")
    set_seed(0)
    networks, _ = prepared(make_accelerator(config), config)
    x, eps, z_p = (t[rank * half:(rank + 1) * half] for t in make_inputs(config, dtype=torch.float32))
    grads = routed_gradients(*networks, x, eps, z_p, config)
    for name in PerNetwork._fields:
        for i, g in enumerate(grads[name]):
            results[f"bf16_allreduce.{name}.{i}"] = g.clone()

    # Rank 0's batch alone would rest the discriminator (real cost 0.2 < 0.68 − 0.35); the batch's mean, 0.4, not.
    rests = equilibrium_rests(losses_with(0.2 if rank == 0 else 0.6, 0.5, 0.5), tiny_config(gan_margin=0.35))
    results["margin.rests"] = torch.stack(list(rests))

    save_file(results, f"{out_dir}/rank{rank}.safetensors")
    accelerator.wait_for_everyone()
    leave(0)  # as train.py ends: the process group destroyed, then os._exit


if __name__ == "__main__":
    main(sys.argv[1])
