"""Run by tests/test_gpu.py on a machine with one GPU: 2 processes share cuda:0 over gloo (NCCL needs one GPU per
process). Each takes half of one batch and the matching noise through DDP-wrapped networks; rank 0 also computes
the whole batch in one plain process. Writes out_dir/rank{0,1}.safetensors: the averaged routed gradients (and,
rank 0, the whole batch's)."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import tiny_config
from tests.test_step import BATCH, make_inputs
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.step import routed_gradients


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    device = torch.device("cuda", 0)
    config = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    networks = [net.to(device) for net in build_models(config)]
    inputs = [t.to(device) for t in make_inputs(config, dtype=torch.float32)]
    results = {}
    if rank == 0:
        whole = routed_gradients(*networks, *inputs, config)
        results.update({f"whole.{n}.{i}": g.clone() for n in PerNetwork._fields for i, g in enumerate(whole[n])})
    wrapped = [DistributedDataParallel(net, device_ids=[0]) for net in networks]
    half = BATCH // 2
    grads = routed_gradients(*wrapped, *(t[rank * half:(rank + 1) * half] for t in inputs), config)
    results.update({f"ddp.{n}.{i}": g.clone() for n in PerNetwork._fields for i, g in enumerate(grads[n])})
    save_file({k: v.cpu().contiguous() for k, v in results.items()}, f"{out_dir}/rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


def main(out_dir: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, out_dir), nprocs=2)


if __name__ == "__main__":
    main(sys.argv[1])
