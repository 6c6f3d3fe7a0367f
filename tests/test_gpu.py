"""The CUDA path: `python -m pytest -m gpu` on a machine with a GPU (benchmarks/gpu_check.sh runs them).
Elsewhere every test here is skipped, and says so.

Training in fp32, bf16 and fp16 (the real torch.amp.GradScaler); an fp16 overflow; bitwise resume with
deterministic algorithms; the launch-free step (--cuda-graphs) against the eager step; evaluation and sampling
on the GPU; two processes (NCCL on two GPUs, else gloo on one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_config, tiny_flags
from tests.test_resume import FLAGS, assert_same_weights, final_checkpoint, losses_after, weights
from tests.test_step import make_inputs, state_of
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.step import adam_optimizers, train_step

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs CUDA: no GPU on this machine")]
CUDA = torch.device("cuda", 0)


def gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def run_script(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=gpu_env(),
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("precision", "graphs"), [("no", False), ("bf16", False), ("fp16", False),
                                                   ("no", True), ("bf16", True)])
def test_train_py_runs_two_steps_on_the_gpu(tmp_path, precision, graphs):
    result = run_script(["train.py", *tiny_flags(max_steps=2, log_every=1, output_dir=tmp_path, cuda_graphs=graphs),
                         "--mixed-precision", precision])
    assert "needs a GPU" not in result.stdout + result.stderr
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["peak_memory_mb"] > 0 for r in logged)
    state = final_checkpoint(tmp_path).state
    if precision == "fp16":  # the real GradScaler: its state is checkpointed
        assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    else:
        assert all(r["skipped_steps"] == 0 and all(v == v for v in r.values() if isinstance(v, float))
                   for r in logged)


def autocast_networks(networks: PerNetwork, dtype: torch.dtype) -> PerNetwork:
    """The networks on the GPU with their forward passes under autocast, as Accelerate wraps them."""
    for net in networks:
        net.to(CUDA)
        net.forward = torch.autocast("cuda", dtype=dtype)(net.forward)
    return networks


def test_fp16_overflow_skips_every_network_and_lowers_the_scale_once():
    config = tiny_config(dropout=0.0)
    networks = autocast_networks(build_models(config), torch.float16)
    optimizers = adam_optimizers(networks, config)
    before = state_of(networks)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**127, growth_interval=1)  # a huge scaled loss
    result = train_step(networks, optimizers, make_inputs(config, dtype=torch.float32)[0].to(CUDA), config, scaler)
    assert not result.stepped and not torch.isfinite(result.grad_norms).all()
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(networks), strict=True))
    assert all(not opt.state for opt in optimizers)
    assert scaler.get_scale() == 2.0**126
    good = torch.amp.GradScaler("cuda", init_scale=1024.0)
    assert train_step(networks, optimizers, make_inputs(config, dtype=torch.float32)[0].to(CUDA), config,
                      good).stepped


@pytest.mark.parametrize("graphs", [False, True])
def test_stop_and_resume_is_bitwise_identical_on_the_gpu(tmp_path, graphs):
    """fp32, deterministic algorithms on: 10 steps + resume + 10 steps == 20 steps."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    script = str(REPO / "tests" / "scripts" / "deterministic_train.py")
    for output_dir, steps in ((straight, 20), (broken, 10), (broken, 20)):
        run_script([script, *tiny_flags(**FLAGS, max_steps=steps, output_dir=output_dir, cuda_graphs=graphs),
                    "--mixed-precision", "no"])
    assert_same_weights(weights(straight), weights(broken))
    assert losses_after(broken, 10) == losses_after(straight, 10)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_the_captured_step_equals_the_eager_step(spectral_norm):
    """Same noise and dropout (the CUDA generator), same updates, the same skip of a non-finite batch, a
    learning-rate change honoured, and the generator left where the eager steps leave it."""
    config = tiny_config(dropout=0.1, spectral_norm=spectral_norm, cuda_graphs=True)
    from vaegan_dist.training.cuda_graphs import GraphedStep

    torch.manual_seed(0)
    eager_nets = PerNetwork(*(net.to(CUDA) for net in build_models(config)))
    graphed_nets = PerNetwork(*(net.to(CUDA) for net in build_models(config)))
    for a, b in zip(eager_nets, graphed_nets, strict=True):
        b.load_state_dict(a.state_dict())
    eager_opts = adam_optimizers(eager_nets, dataclasses.replace(config, cuda_graphs=False))  # not capturable
    graphed_opts = adam_optimizers(graphed_nets, config)
    step = GraphedStep()
    batches = [t.to(CUDA) for t in torch.rand(5, 16, 784).mul(2).sub(1)]
    batches[3][2, 5] = float("nan")
    outcomes = {}
    for name, nets, opts, fn in (("eager", eager_nets, eager_opts, train_step),
                                 ("graphed", graphed_nets, graphed_opts, step)):
        torch.cuda.manual_seed(1)
        results = []
        for index, x in enumerate(batches):
            for opt in opts:
                opt.param_groups[0]["lr"] = config.lr * (0.5 if index >= 2 else 1.0)
            results.append(fn(nets, opts, x, config))
        outcomes[name] = (results, torch.cuda.get_rng_state())
    (eager, eager_rng), (graphed, graphed_rng) = outcomes["eager"], outcomes["graphed"]
    assert [r.stepped for r in eager] == [r.stepped for r in graphed] == [True, True, True, False, True]
    for e, g in zip(eager, graphed, strict=True):
        torch.testing.assert_close(g.terms.stacked(), e.terms.stacked(), rtol=1e-4, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(g.grad_norms, e.grad_norms, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(state_of(graphed_nets), state_of(eager_nets), rtol=1e-4, atol=1e-5)
    assert torch.equal(graphed_rng, eager_rng)
    for e_opt, g_opt in zip(eager_opts, graphed_opts, strict=True):
        e_state, g_state = e_opt.state_dict(), g_opt.state_dict()
        assert e_state["param_groups"][0]["lr"] == g_state["param_groups"][0]["lr"] == config.lr * 0.5
        assert [s["step"].item() for s in e_state["state"].values()] == \
            [s["step"].item() for s in g_state["state"].values()] == [4.0] * len(e_state["state"])


def test_evaluation_and_sampling_run_on_the_gpu(exported, tmp_path, capsys):
    from vaegan_dist.cli import sample
    from vaegan_dist.evaluation import scores as evaluation

    out = tmp_path / "scores.json"
    evaluation.main([str(exported), "--samples", "200", "--out", str(out), "--device", "cuda"])
    scores = json.loads(out.read_text())
    assert scores and all(v == v for v in scores.values() if isinstance(v, float))
    for mode, name in (("samples", "s.png"), ("reconstruct", "r.npy"), ("interpolate", "i.gif")):
        sample.main([str(exported), "--mode", mode, "--out", str(tmp_path / name), "--device", "cuda"])
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.skipif(GPUS < 2, reason="needs CUDA: no GPU on this machine" if GPUS == 0 else
                    f"needs 2 GPUs, this machine has {GPUS}: the gloo test on one GPU ran instead")
def test_two_processes_over_nccl_on_two_gpus(tmp_path):
    run_script(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
                *tiny_flags(max_steps=4, log_every=2, output_dir=tmp_path)], timeout=400)
    state = final_checkpoint(tmp_path).state
    assert state["world_size"] == 2 and len(set(state["replica_digests"])) == 1
    assert [r["step"] for r in records(tmp_path)] == [2, 4]


@pytest.mark.skipif(GPUS >= 2, reason=f"this machine has {GPUS} GPUs: the NCCL test ran instead")
def test_two_processes_on_one_gpu_over_gloo(tmp_path):
    run_script([str(REPO / "tests" / "scripts" / "two_processes_one_gpu.py"), str(tmp_path)])
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    whole = {k.removeprefix("whole."): v for k, v in ranks[0].items() if k.startswith("whole.")}
    assert whole
    for key, expected in whole.items():
        for rank in ranks:  # each process holds the average of both halves' gradients: the whole batch's
            torch.testing.assert_close(rank[f"ddp.{key}"], expected, rtol=1e-4, atol=1e-6)
