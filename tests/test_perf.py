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
from benchmarks.bench import executed_flops, format_table, minimal_products, step_products, targets
from tests import forked
from tests.conftest import REPO, tiny_config, tiny_flags
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES
from vaegan_dist.config import TrainConfig
from vaegan_dist.model.dropout import Dropout
from vaegan_dist.model.losses import vaegan_losses
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.cpu import cpu_flags, emulates_bf16, keep_freed_memory
from vaegan_dist.training.step import adam_optimizers, routed_gradients


@pytest.mark.parametrize("preset", ["seed", "default"])  # logit and hidden-layer similarity
def test_step_multiplies_exactly_the_matrices_counted_from_the_layer_shapes(preset):
    """torch's FLOP counter over one routed step agrees with the count that the benchmark prints."""
    config = TrainConfig.preset(preset, hidden_dim=64, depth=3, latent_dim=8)
    products = step_products(config, 12)
    assert executed_flops(config, 12) == sum(p.flops for p in products)
    # Dis_l: the encoder's loss passes back through the discriminator's logit layer only when it is the logit.
    logit_input_grads = [p for p in products if p.kind == "input_grad" and p.k == 1]  # fan_out 1: the logit's
    assert len(logit_input_grads) == (3 if config.similarity == "logit" else 2)


def flops(products) -> int:
    return sum(p.flops for p in products)


@pytest.mark.parametrize("similarity", ["logit", "hidden"])
def test_minimal_products_are_the_hand_count_of_a_tiny_step(similarity):
    config = TrainConfig.preset("seed", hidden_dim=8, depth=2, latent_dim=2, similarity=similarity)
    batch = 3
    encoder, decoder = [(784, 8), (8, 8), (8, 2), (8, 2)], [(2, 8), (8, 8), (8, 784)]  # (fan_in, fan_out)
    discriminator = [(784, 8), (8, 4), (4, 1)]
    dis_l = discriminator if similarity == "logit" else discriminator[:-1]  # up to Dis_l

    def row(layers) -> int:  # one row through these layers, one product each
        return sum(2 * fan_in * fan_out for fan_in, fan_out in layers)

    per_image = (2 * row(encoder) + row(encoder[1:])  # x: forward, weight gradient, its loss's input gradient
                 + 2 * 2 * row(decoder) + 2 * row(decoder[1:])  # z, z_p: the same
                 + 2 * 3 * row(discriminator) + 3 * row(discriminator[1:])  # x, x̃, x_p: the same
                 + row(decoder)  # z: the encoder's loss, down to z
                 + 2 * row(discriminator) + row(dis_l))  # x̃, x_p: the decoder's loss; x̃: the encoder's, to Dis_l
    assert per_image == {"logit": 228_288, "hidden": 228_280}[similarity]
    minimal, step = minimal_products(config, batch), step_products(config, batch)
    assert flops(minimal) == batch * per_image
    # Our step multiplies the same products, some on more rows: exactly those no gradient needs.
    assert [(p.kind, p.k, p.n) for p in step] == [(p.kind, p.k, p.n) for p in minimal]
    extra = sorted((p.kind, p.k, p.n, p.m - q.m) for p, q in zip(step, minimal, strict=True) if p.m != q.m)
    unneeded = ([("input_grad", fan_out, fan_in, batch) for fan_in, fan_out in decoder]  # z_p: the encoder's loss
                + [("input_grad", fan_out, fan_in, batch) for fan_in, fan_out in discriminator]  # x: the decoder's
                + [("input_grad", fan_out, fan_in, 2 * batch) for fan_in, fan_out in dis_l])  # x, x_p: the encoder's
    assert extra == sorted(unneeded)
    assert flops(step) - flops(minimal) == batch * (row(decoder) + row(discriminator) + 2 * row(dis_l))


def test_minimal_flops_of_the_default_sizes():
    """The figure the README gives: 87.03 MFLOP per image of the 101.62 that our step multiplies."""
    config = TrainConfig.preset("seed")
    assert (flops(minimal_products(config, 128)), flops(step_products(config, 128))) == \
        (128 * 87_029_760, 128 * 101_621_248)


def sliced_step(networks: PerNetwork, x, eps, z_p, config: TrainConfig) -> dict[str, list[torch.Tensor]]:
    """The routed step with each batch through each network on its own, not concatenated: autograd then
    multiplies only the rows whose gradients reach the parameters of the loss's network."""
    mu, logvar = networks.encoder(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    x_tilde, x_p = networks.decoder(z), networks.decoder(z_p)
    (logit_x, dis_l_x), (logit_x_tilde, dis_l_x_tilde), (logit_x_p, _) = (
        networks.discriminator(batch, with_similarity=True) for batch in (x, x_tilde, x_p))
    terms = vaegan_losses(mu, logvar, (logit_x, logit_x_tilde, logit_x_p), (dis_l_x, dis_l_x_tilde),
                          config.gamma, config.beta, config.generator_loss, pixels=(x, x_tilde),
                          kl_weight=config.kl_weight, pixel_weight=config.pixel_weight,
                          normalise_similarity=config.normalise_similarity, z=z,
                          prior_match_weight=config.prior_match_weight)
    params = {name: list(net.parameters()) for name, net in networks._asdict().items()}
    for name, loss in zip(PerNetwork._fields, (terms.enc_loss, terms.dec_loss, terms.dis_loss), strict=True):
        loss.backward(inputs=params[name], retain_graph=True)
    return {name: [p.grad for p in ps] for name, ps in params.items()}


@pytest.mark.parametrize("preset", ["seed", "paper", "starting_point", "default"])
def test_minimal_products_are_what_autograd_multiplies_with_each_batch_alone(preset):
    """The derivation checked by autograd: with each batch through each network on its own, the routed backward
    passes multiply exactly minimal_products (torch's FLOP counter), and give our step's gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    config = TrainConfig.preset(preset, hidden_dim=16, depth=3, latent_dim=4)
    batch = 5
    with torch.device("meta"):
        networks = build_models(config)
        x, (eps, z_p) = torch.rand(batch, 784), torch.randn(2, batch, config.latent_dim)
    with FlopCounterMode(display=False) as counter:
        sliced_step(networks, x, eps, z_p, config)
    assert counter.get_total_flops() == flops(minimal_products(config, batch))

    torch.manual_seed(0)
    networks = PerNetwork(*(net.double().eval() for net in build_models(config)))  # no dropout: the same math
    x = torch.rand(batch, 784, dtype=torch.float64) * 2 - 1
    eps, z_p = torch.randn(2, batch, config.latent_dim, dtype=torch.float64)
    sliced = sliced_step(networks, x, eps, z_p, config)
    routed = routed_gradients(*networks, x, eps, z_p, config)
    for name in PerNetwork._fields:
        torch.testing.assert_close(sliced[name], routed[name])


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
    code = ("import torch; from vaegan_dist.training.cpu import configure_cpu; configure_cpu(2); "
            "tiny = torch.full((1 << 22,), 1e-39); "
            "print(torch.get_num_threads(), torch.count_nonzero(tiny * 1.0).item())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "0"]


def test_heap_keeps_freed_memory_on_glibc():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize(("line", "emulated"), [
    ("flags\t\t: fpu sse2 avx2 fma", True), ("flags\t\t: fpu avx2 avx512f avx512_bf16", False),
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile", False), ("Features\t: fp asimd sve bf16 i8mm", False),
    ("Features\t: fp asimd", True)])
def test_a_cpu_without_bf16_instructions_is_told_from_its_flags(tmp_path, line, emulated):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\nflags\t\t: avx512_bf16 amx_bf16\n")
    assert emulates_bf16(cpu_flags(cpuinfo)) is emulated  # the first processor's flags decide


def test_a_cpu_whose_flags_are_not_listed_is_not_said_to_emulate_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\n")  # no colon: no flags either
    assert cpu_flags(cpuinfo) is None and cpu_flags(tmp_path / "absent") is None and not emulates_bf16(None)


def test_bench_quick_writes_its_table_and_json(tmp_path):
    # The smallest run: one precision, one process count, no compilation, one timed window of one step.
    output = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--precisions", "fp32", "--compile",
                             "off", "--processes", "1", "--window", "1", "--windows", "1", "--output", str(output)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(output.read_text())
    assert {"machine", "command", "config", "flops_per_image", "minimal_flops_per_image", "load_average", "rows",
            "targets", "table"} <= set(results)
    runs = {(r["run"], r["precision"], r["processes"], r["compile"]) for r in results["rows"]}
    assert runs == {("ceiling", "fp32", None, None), ("mm1024", "fp32", None, None), ("baseline", "fp32", 1, False),
                    ("ours", "fp32", 1, False)}
    for row in results["rows"]:
        assert row["images_per_s"] > 0 and row["step_time_ms"] > 0 and row["samples"]
        # Both counts on our runs; each ceiling in its own.
        assert (row["gflop_per_s"] is None) == (row["run"] == "mm1024") == (row["fraction_of_ceiling"] is None)
        assert (row["minimal_gflop_per_s"] is None) == (row["run"] == "ceiling") == \
            (row["fraction_of_mm1024"] is None)
    assert results["config"]["mm1024_rows"] == [128, 256, 384]
    quick = TrainConfig.preset("seed", hidden_dim=32, depth=2, latent_dim=4)
    assert results["flops_per_image"] == sum(p.flops for p in step_products(quick, 16)) / 16
    assert results["minimal_flops_per_image"] == sum(p.flops for p in minimal_products(quick, 16)) / 16
    # Both counts' fp32 verdicts, printed as they are in the JSON.
    assert [(v["count"], v["line"].split(" (target")[0].split("% of the ")[1]) for v in results["targets"]] == \
        [("step", "fp32 ceiling"), ("minimal", "fp32 ceiling")]
    assert all(v["line"] in result.stdout and isinstance(v["met"], bool) for v in results["targets"])
    assert results["table"] in result.stdout and "load average" in result.stdout


def test_bench_refuses_an_unknown_gradient_averaging_before_measuring():
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--allreduce", "fp32,fp16"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "fp16 is not one of fp32, bf16" in result.stderr
    assert "machine:" not in result.stdout  # nothing measured


def test_bench_judges_each_gradient_averaging_of_two_processes_and_names_bf16():
    def ours(processes, allreduce, images_per_s):
        return {"run": "ours", "precision": "fp32", "processes": processes, "compile": False, "allreduce": allreduce,
                "images_per_s": images_per_s, "step_time_ms": 1.0, "gflop_per_s": None, "fraction_of_ceiling": None,
                "minimal_gflop_per_s": None, "fraction_of_mm1024": None, "vs_baseline_fp32": 1.0}

    rows = [ours(1, "fp32", 1000.0), ours(2, "fp32", 850.0), ours(2, "bf16", 950.0)]
    assert [v["line"] for v in targets(rows, torch.device("cpu"))] == [
        "2 processes: 85% of 1 process (target 90%): missed (fp32, compile off)",
        "2 processes: 95% of 1 process (target 90%): met (fp32, compile off, bf16 gradient averaging)"]
    table = format_table(rows).splitlines()
    assert [line.split(" | ")[4] for line in table[2:]] == ["", "fp32", "bf16"]


def test_compiled_networks_train_and_checkpoint_under_their_own_names(tmp_path):
    result = forked.run("vaegan_dist.train", tiny_flags(max_steps=2, log_every=1, output_dir=tmp_path / "run",
                                                        compile=True), tmp_path / "logs", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["skipped_steps"] == 0 for r in records)
    checkpoint = Checkpoint(newest_complete(checkpoints_dir(tmp_path / "run"), report=print))
    assert checkpoint.config["compile"] is True
    encoder, decoder, _ = build_models(tiny_config())
    assert set(checkpoint.network("encoder")) == set(encoder.state_dict())
    assert set(checkpoint.network(AVERAGE_FILES["encoder"])) == set(encoder.state_dict())  # the default's averages
    assert set(checkpoint.network(AVERAGE_FILES["decoder"])) == set(decoder.state_dict())


def test_conv_bench_times_the_data_path_beside_both_steps(tmp_path):
    output = tmp_path / "conv.json"
    result = subprocess.run([sys.executable, "benchmarks/conv_bench.py", "--images", "20", "--image-size", "16",
                             "--width", "0.0625", "--latent-dim", "4", "--batch-size", "8", "--rounds", "1",
                             "--min-time", "0.05", "--output", str(output)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    medians = json.loads(output.read_text())["medians"]
    assert set(medians) == {"decode", "batches", "ours", "plain"} and all(rate > 0 for rate in medians.values())
    assert "| ours |" in result.stdout and "| plain | " in result.stdout
