"""The benchmark counts the FLOPs that the step runs and runs end to end, beside a baseline with torch's own
layers; fused Adam is Adam; compiled networks train; the CPU settings hold on every thread."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from benchmarks.baseline import with_torch_dropout
from benchmarks.bench import executed_flops, step_products
from tests.conftest import REPO, tiny_config, tiny_flags
from vaegan_dist.checkpoint import EMA_FILE, Checkpoint, checkpoints_dir, newest_complete
from vaegan_dist.config import TrainConfig
from vaegan_dist.cpu import keep_freed_memory
from vaegan_dist.models import Dropout, build_models
from vaegan_dist.step import adam_optimizers


@pytest.mark.parametrize("preset", ["seed", "default"])  # logit and hidden-layer similarity
def test_step_multiplies_exactly_the_matrices_counted_from_the_layer_shapes(preset):
    """torch's FLOP counter over one routed step agrees with the count that the benchmark prints."""
    config = TrainConfig.preset(preset, hidden_dim=64, depth=3, latent_dim=8)
    products = step_products(config, 12)
    assert executed_flops(config, 12) == sum(p.flops for p in products)
    # Dis_l: the encoder's loss passes back through the discriminator's logit layer only when it is the logit.
    logit_input_grads = [p for p in products if p.kind == "input_grad" and p.k == 1]  # fan_out 1: the logit's
    assert len(logit_input_grads) == (3 if config.similarity == "logit" else 2)


def test_the_baseline_has_the_same_networks_with_torch_dropout():
    config = tiny_config(dropout=0.2)
    for ours, baseline in zip(build_models(config), map(with_torch_dropout, build_models(config)), strict=True):
        assert [type(m).__name__ for m in baseline.modules()] == [type(m).__name__ for m in ours.modules()]
        dropouts = [m for m in baseline.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(type(m) is torch.nn.Dropout and m.p == 0.2 for m in dropouts)
        assert not any(isinstance(m, Dropout) for m in baseline.modules())


def test_fused_adam_steps_as_adam_does():
    config = tiny_config(lr=1e-3, adam_beta1=0.7)
    torch.manual_seed(0)
    fused_nets, plain_nets = build_models(config), build_models(config)
    for fused_net, plain_net in zip(fused_nets, plain_nets, strict=True):
        plain_net.load_state_dict(fused_net.state_dict())
    initial = [p.detach().clone() for net in plain_nets for p in net.parameters()]
    fused = adam_optimizers(fused_nets, config)
    plain = [torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.7, config.adam_beta2)) for net in plain_nets]
    assert all(opt.param_groups[0]["fused"] for opt in fused)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in initial]
        for nets, optimizers in ((fused_nets, fused), (plain_nets, plain)):
            for p, g in zip((p for net in nets for p in net.parameters()), grads, strict=True):
                p.grad = g.clone()
            for opt in optimizers:
                opt.step()
    stepped = [p.detach() for net in fused_nets for p in net.parameters()]
    torch.testing.assert_close(stepped, [p.detach() for net in plain_nets for p in net.parameters()])
    assert all(not torch.equal(a, b) for a, b in zip(stepped, initial, strict=True))


def test_cpu_setup_flushes_denormals_on_every_thread_of_the_pool():
    # In a fresh process, as train.py runs it: 2²² elements are split over both threads.
    code = ("import torch; from vaegan_dist.cpu import configure_cpu; configure_cpu(2); "
            "tiny = torch.full((1 << 22,), 1e-39); "
            "print(torch.get_num_threads(), torch.count_nonzero(tiny * 1.0).item())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "0"]


def test_heap_keeps_freed_memory_on_glibc():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_bench_quick_writes_its_table_and_json(tmp_path):
    # The smallest run: one precision, one process count, no compilation, one timed window of one step.
    output = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--precisions", "fp32", "--compile",
                             "off", "--processes", "1", "--window", "1", "--windows", "1", "--output", str(output)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(output.read_text())
    assert {"machine", "command", "config", "flops_per_image", "load_average", "rows", "targets", "table"} <= \
        set(results)
    runs = {(r["run"], r["precision"], r["processes"], r["compile"]) for r in results["rows"]}
    assert runs == {("ceiling", "fp32", None, None), ("baseline", "fp32", 1, False), ("ours", "fp32", 1, False)}
    for row in results["rows"]:
        assert row["images_per_s"] > 0 and row["step_time_ms"] > 0 and row["samples"]
    assert [t["target"] for t in results["targets"]] == ["fp32 at 80% of the fp32 matrix-product ceiling or more"]
    quick = TrainConfig.preset("seed", hidden_dim=32, depth=2, latent_dim=4)
    assert results["flops_per_image"] == sum(p.flops for p in step_products(quick, 16)) / 16
    assert results["table"] in result.stdout and "load average" in result.stdout


def test_compiled_networks_train_and_checkpoint_under_their_own_names(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.train", *tiny_flags(
        max_steps=2, log_every=1, output_dir=tmp_path, compile=True)], capture_output=True, text=True, cwd=REPO,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["skipped_steps"] == 0 for r in records)
    checkpoint = Checkpoint(newest_complete(checkpoints_dir(tmp_path), report=print))
    assert checkpoint.config["compile"] is True
    encoder, decoder, _ = build_models(tiny_config())
    assert set(checkpoint.network("encoder")) == set(encoder.state_dict())
    assert set(checkpoint.network(EMA_FILE)) == set(decoder.state_dict())  # the default preset's moving average
