"""The step computes only what its losses need, the CPU dropout is dropout, compiled networks train, and the
benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.bench import executed_flops, step_products
from tests.conftest import REPO, tiny_config, tiny_flags
from vaegan_dist.checkpoint import Checkpoint, checkpoints_dir, newest_complete
from vaegan_dist.config import TrainConfig
from vaegan_dist.models import Dropout, build_models


def test_routed_step_multiplies_no_matrix_it_does_not_need():
    """The FLOPs torch counts over one routed step equal the minimal count from the layer shapes."""
    for similarity in ("logit", "hidden"):
        config = TrainConfig.preset("seed", hidden_dim=64, depth=3, latent_dim=8, similarity=similarity)
        assert executed_flops(config, 12) == sum(p.flops for p in step_products(config, 12))


def test_cpu_dropout_keeps_one_minus_p_and_scales_what_it_keeps():
    torch.manual_seed(0)
    dropout = Dropout(0.25)
    x = torch.rand(1000, 1000) + 1
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.002  # 5 standard deviations of the mean
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x)


def test_bench_quick_writes_its_table_and_json(tmp_path):
    output = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--compile", "off",
                             "--output", str(output)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(output.read_text())
    assert {"machine", "command", "config", "flops_per_image", "load_average", "rows", "targets", "table"} <= \
        set(results)
    runs = {(r["run"], r["precision"], r["processes"], r["compile"]) for r in results["rows"]}
    assert runs == {("ceiling", "fp32", None, None), ("ceiling", "bf16", None, None),
                    ("baseline", "fp32", 1, False), *(("ours", p, n, False) for p in ("fp32", "bf16") for n in (1, 2))}
    for row in results["rows"]:
        assert row["images_per_s"] > 0 and row["step_time_ms"] > 0 and row["samples"]
    tiny = tiny_config(depth=2, hidden_dim=32, latent_dim=4)
    assert results["flops_per_image"] == sum(p.flops for p in step_products(tiny, 16)) / 16
    assert results["table"] in result.stdout and "load average" in result.stdout


def test_compiled_networks_train_and_checkpoint_under_their_own_names(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vaegan_dist.train", *tiny_flags(
        max_steps=2, log_every=1, output_dir=tmp_path, compile=True)], capture_output=True, text=True, cwd=REPO,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["skipped_steps"] == 0 for r in records)
    checkpoint = Checkpoint(newest_complete(checkpoints_dir(tmp_path), report=print))
    assert set(checkpoint.network("encoder")) == set(build_models(tiny_config())[0].state_dict())
