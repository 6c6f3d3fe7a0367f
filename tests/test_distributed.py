"""Real multi-process runs on the CPU (gloo): DDP equivalence, identical replicas, and the trainer's outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tests.conftest import REPO, launch, tiny_config, tiny_flags
from tests.test_step import make_inputs
from vaegan_dist.model.losses import LossTerms
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.loop import train
from vaegan_dist.training.step import adam_optimizers, routed_gradients


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = launch([str(out)], num_processes=2, script=REPO / "tests" / "scripts" / "ddp_step.py")
    assert result.returncode == 0, result.stderr[-4000:]
    return [load_file(out / f"rank{rank}.safetensors") for rank in range(2)]


def initial_weights(config):
    """The weights the script's networks start from (it seeds with 0), keyed like its files."""
    torch.manual_seed(0)
    return {f"{name}.{i}": p.detach() for name, net in zip(PerNetwork._fields, build_models(config), strict=True)
            for i, p in enumerate(net.parameters())}


def test_two_half_batches_average_to_one_whole_batch(ddp_ranks):
    """Proof 1: the averaged gradients and the weights after one step equal one process on the whole batch."""
    config = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    grads = routed_gradients(*networks, *make_inputs(config, dtype=torch.float32), config)
    for optimizer in optimizers:
        optimizer.step()
    for rank in ddp_ranks:
        for name, net in zip(PerNetwork._fields, networks, strict=True):
            for i, (g, p) in enumerate(zip(grads[name], net.parameters(), strict=True)):
                torch.testing.assert_close(rank[f"grad.{name}.{i}"], g, rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(rank[f"step1.{name}.{i}"], p.detach(), rtol=1e-5, atol=1e-6)


def test_gradients_averaged_in_bf16_with_gradient_allreduce_bf16(ddp_ranks):
    """Proof 6: with --gradient-allreduce bf16 each averaged gradient is a bf16 number (the fp32 averages of proof 1
    almost never are), the same on both processes, and the fp32 average to within bf16's rounding."""
    keys = [k for k in ddp_ranks[0] if k.startswith("bf16_allreduce.")]
    assert len(keys) == sum(len(list(net.parameters())) for net in build_models(tiny_config()))
    for key in keys:
        averaged, fp32_average = ddp_ranks[0][key], ddp_ranks[0][key.replace("bf16_allreduce.", "grad.")]
        assert averaged.dtype == torch.float32 and torch.equal(averaged, ddp_ranks[1][key]), key
        assert torch.equal(averaged.bfloat16().float(), averaged), key
        # Norm-wise: where the processes' gradients nearly cancel, an element's bf16 error is large beside it.
        assert (averaged - fp32_average).norm() <= 2**-7 * fp32_average.norm(), key
    assert not all(torch.equal(ddp_ranks[0][k], ddp_ranks[0][k.replace("bf16_allreduce.", "grad.")]) for k in keys)


def test_gradient_allreduce_bf16_in_one_process_says_it_does_nothing(tmp_path, capsys):
    assert train(tiny_config(gradient_allreduce="bf16", max_steps=1, output_dir=str(tmp_path)),
                 Accelerator(cpu=True)) == 0
    assert "--gradient-allreduce bf16 has no effect in one process" in " ".join(capsys.readouterr().err.split())


def test_replicas_hold_identical_weights_after_k_steps(ddp_ranks):
    """Proof 2: different data, noise and dropout masks per process, bitwise-identical weights."""
    keys = [k for k in ddp_ranks[0] if k.startswith("replica.")]
    assert len(keys) == sum(len(list(net.parameters())) for net in build_models(tiny_config()))
    for key in keys:
        assert torch.equal(ddp_ranks[0][key], ddp_ranks[1][key]), key
    initial = initial_weights(tiny_config())
    assert not any(torch.equal(ddp_ranks[0][f"replica.{k}"], p) for k, p in initial.items())


def test_fp16_overflow_on_one_process_skips_the_step_on_both(ddp_ranks):
    initial = initial_weights(tiny_config(dropout=0.0))
    for rank in ddp_ranks:
        assert not rank["fp16.stepped_on_overflow"]
        assert rank["fp16.scale_after_overflow"].item() == 512.0  # halved once, not once per optimizer
        assert rank["fp16.stepped_after"]
        assert all(torch.equal(rank[f"fp16.{k}"], p) for k, p in initial.items())


def test_nan_in_one_process_batch_skips_the_step_on_both_and_replicas_stay_identical(ddp_ranks):
    keys = [k for k in ddp_ranks[0] if k.startswith("nan.") and k.count(".") == 2]
    assert keys
    for rank in ddp_ranks:
        assert not rank["nan.stepped"] and rank["nan.stepped_after"]
    for key in keys:
        assert torch.isfinite(ddp_ranks[0][key]).all(), key
        assert torch.equal(ddp_ranks[0][key], ddp_ranks[1][key]), key


def test_the_equilibrium_rule_reads_the_whole_batch_so_every_process_rests_the_same_networks(ddp_ranks):
    assert all(not rank["margin.rests"].any() for rank in ddp_ranks)


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_accelerate_launch_two_processes_trains_and_writes_outputs(tmp_path):
    # A global batch of 4096 makes an epoch 14 steps, so the run crosses an epoch boundary and stops mid-epoch.
    result = launch(tiny_flags(global_batch_size=4096, max_steps=20, log_every=5,
                               output_dir=tmp_path), num_processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes on 1 node" in result.stdout and "2048 per process, 4096 global" in result.stdout

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["global_batch_size"] == 4096 and config["mixed_precision"] == "no"
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert [r["epoch"] for r in records] == [0, 0, 1, 1]
    for record in records:
        assert set(LossTerms.names()) | {"step", "epoch", "images_per_s"} <= set(record)
        assert record["images_per_s"] > 0 and record["skipped_steps"] == 0
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if k.endswith("_loss"))
    for kind in ("samples", "reconstructions"):
        assert (tmp_path / kind / "epoch_001.png").stat().st_size > 0
        assert (tmp_path / kind / "step_0000020.png").stat().st_size > 0


def test_python_m_entry_point_trains(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.train", *tiny_flags(
        max_steps=3, log_every=1, output_dir=tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_console_script_is_installed():
    path = shutil.which("vaegan-train")
    assert path, "vaegan-train is not on PATH: install the package with the README's command (pip install -e .)"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-steps" in result.stdout
