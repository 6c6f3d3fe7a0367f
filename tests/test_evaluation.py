"""The evaluation: it separates real digits from blurred digits and noise, measures reconstructions, runs split
over processes with the same result, leaves training untouched, and vaegan-eval reports it with its floor."""

from __future__ import annotations

import json
import math
import re
from importlib import import_module
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from tests import forked
from tests.conftest import REPO, launch, tiny_config, tiny_flags
from tests.test_distributed import read_metrics
from vaegan_dist.cli import eval as eval_command
from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.classifier import NUM_CLASSES, embed
from vaegan_dist.evaluation.scores import Reference, evaluate, share
from vaegan_dist.hub.network_files import load_networks
from vaegan_dist.model.networks import images_to_pixels

NUM_SAMPLES = 300
SAMPLE_KEYS = {"fid", "kid", "precision", "recall", "inception_score", *(f"class_{c}" for c in range(NUM_CLASSES))}
LATENT_KEYS = {"latent_mean_abs", "latent_std_mean", "latent_std_min", "latent_std_max", "latent_std_worst",
               "latent_sigma"}
MODEL_KEYS = {*SAMPLE_KEYS, "recon_mse", "recon_accuracy", "recon_fid", *LATENT_KEYS}


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference("cpu")


def blur(pixels: torch.Tensor) -> torch.Tensor:
    return gaussian_blur(pixels.reshape(-1, 1, 28, 28), kernel_size=9, sigma=1.0).reshape(len(pixels), -1)


def test_metrics_separate_real_digits_from_blurred_digits_and_noise(reference):
    images, _ = load_mnist(None, "train")
    real = images_to_pixels(images[-NUM_SAMPLES:])
    noise = torch.rand(NUM_SAMPLES, 784, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = {name: reference.sample_metrics(*embed(reference.classifier, pixels))
              for name, pixels in (("real", real), ("blurred", blur(real)), ("noise", noise))}
    real, blurred, noise = scores["real"], scores["blurred"], scores["noise"]
    assert 5 * real["fid"] < blurred["fid"] < noise["fid"]
    assert 10 * real["kid"] < min(blurred["kid"], noise["kid"])
    assert real["recall"] > 0.3 and max(blurred["recall"], noise["recall"]) < 0.05
    assert real["precision"] > 2 * noise["precision"]
    assert real["inception_score"] > blurred["inception_score"] > 2 * noise["inception_score"]
    assert max(real[f"class_{c}"] for c in range(NUM_CLASSES)) < 0.2


class PixelsAsLatent(nn.Module):
    """An encoder whose μ is the image itself (latent_dim 784)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(x)


class Blur(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return blur(z)


def test_evaluate_scores_perfect_and_blurring_reconstructions(reference):
    config = tiny_config(latent_dim=784, seed=5)
    perfect = evaluate(PixelsAsLatent(), nn.Identity(), config, NUM_SAMPLES, reference)
    blurring = evaluate(PixelsAsLatent(), Blur(), config, NUM_SAMPLES, reference)
    assert set(perfect) == {*MODEL_KEYS, *(f"floor_{key}" for key in {*SAMPLE_KEYS, "recon_accuracy", "recon_fid"})}
    assert all(math.isfinite(value) for value in perfect.values())
    # Reconstructing with the identity: no error, and the classifier's accuracy on the real test digits.
    assert perfect["recon_mse"] == 0.0
    assert perfect["recon_accuracy"] == perfect["floor_recon_accuracy"] > 0.98
    assert blurring["recon_mse"] > 1e-3 and blurring["recon_accuracy"] < perfect["recon_accuracy"]
    # The samples are Gaussian noise (z passed through): far worse than the floor.
    assert perfect["fid"] > 10 * perfect["floor_fid"] and perfect["recall"] < perfect["floor_recall"] / 10
    # The floor depends on the sample count only; the samples on the seed.
    assert {k: v for k, v in blurring.items() if k.startswith("floor_")} == {
        k: v for k, v in perfect.items() if k.startswith("floor_")}
    assert evaluate(PixelsAsLatent(), nn.Identity(), config, NUM_SAMPLES, reference) == perfect
    reseeded = evaluate(PixelsAsLatent(), nn.Identity(), config, NUM_SAMPLES, reference, seed=6)
    assert reseeded["fid"] != perfect["fid"]


class Standardise(nn.Module):
    """An identity-like encoder with a 784-d code: μ = (x − m) / s per pixel over the test set, σ = 0.1."""

    def __init__(self, pixels: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", pixels.mean(dim=0))
        self.register_buffer("std", pixels.std(dim=0).clamp(min=1e-3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.mean) / self.std, torch.full_like(x, 2 * math.log(0.1))


class Unstandardise(nn.Module):
    """Its decoder, applied to a code that is `scale`·z, or z with its dimensions shuffled, first."""

    def __init__(self, encoder: Standardise, scale: float = 1.0, shuffle: bool = False) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, scale
        order = torch.randperm(784, generator=torch.Generator().manual_seed(0)) if shuffle else torch.arange(784)
        self.register_buffer("order", order)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.scale * z[:, self.order] * self.encoder.std + self.encoder.mean).clamp(-1, 1)


def test_reconstruction_and_posterior_metrics_separate_a_working_autoencoder_from_broken_ones(reference):
    config = tiny_config(latent_dim=784)
    encoder = Standardise(reference.test_pixels[:NUM_SAMPLES])
    scores = {name: evaluate(encoder, decoder, config, NUM_SAMPLES, reference) for name, decoder in (
        ("working", Unstandardise(encoder)), ("shuffled", Unstandardise(encoder, shuffle=True)),
        ("scaled", Unstandardise(encoder, scale=0.2)))}
    working, shuffled, scaled = scores["working"], scores["shuffled"], scores["scaled"]
    # The test images themselves (FID 17 at 300 images, against 10 for 300 training images: sampling noise).
    assert working["recon_accuracy"] > 0.97 and working["recon_mse"] < 1e-6
    assert working["recon_fid"] < 2 * working["floor_recon_fid"]
    for broken in (shuffled, scaled):
        assert broken["recon_accuracy"] < 0.6 and broken["recon_mse"] > 0.01
        assert broken["recon_fid"] > 20 * working["recon_fid"]
    # The code is standardised over these very images: |mean of μ| 0, std of z √(1 + 0.1²) wherever a pixel
    # varies (constant pixels give μ = 0 and std 0.1, give or take the noise of 300 draws: the worst dimension).
    assert working["latent_mean_abs"] < 1e-4 and working["latent_sigma"] == pytest.approx(0.1)
    assert working["latent_std_max"] == pytest.approx(math.sqrt(1.01), rel=0.05)
    assert working["latent_std_worst"] == working["latent_std_min"] == pytest.approx(0.1, rel=0.15)
    # The pixels as the code (the encoder above without standardising): far from the prior.
    raw = evaluate(PixelsAsLatent(), nn.Identity(), config, NUM_SAMPLES, reference)
    assert raw["latent_mean_abs"] > 0.5 and raw["latent_sigma"] == 1.0


def test_shares_cover_the_rows_in_order_then_padding():
    rows = torch.arange(1, 11).float()[:, None]
    for processes in (1, 3, 4, 11):
        shares = [share(rows, SimpleNamespace(num_processes=processes, process_index=r)) for r in range(processes)]
        assert len({len(s) for s in shares}) == 1
        gathered = torch.cat(shares)
        assert torch.equal(gathered[:10], rows) and not gathered[10:].any()


def test_two_processes_evaluate_as_one_does(exported, reference, tmp_path):
    out = tmp_path / "scores.json"
    result = launch([str(exported), str(out)], num_processes=2, script=REPO / "tests" / "scripts" / "eval_ddp.py")
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = json.loads(out.read_text())
    config, encoder, decoder = load_networks(exported)
    single = evaluate(encoder, decoder, config, 203, reference)
    assert distributed.keys() == single.keys()
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def training_records(output_dir):
    """metrics.jsonl without evaluations, timings and memory: what the training computed."""
    return [{k: v for k, v in record.items() if k not in ("images_per_s", "step_time_s", "peak_memory_mb")}
            for record in read_metrics(output_dir) if "enc_loss" in record]


def test_evaluation_during_training_is_logged_and_changes_nothing_else(tmp_path):
    """One process, forked (two processes evaluate as one does: test_two_processes_evaluate_as_one_does)."""
    runs, printed = {}, {}
    for name, eval_samples in (("with", 64), ("without", 0)):
        runs[name] = tmp_path / name
        result = forked.run("vaegan_dist.train", tiny_flags(max_steps=6, log_every=2, eval_every=3,
                                                            eval_samples=eval_samples, output_dir=runs[name]),
                            tmp_path / f"{name}_logs")
        assert result.returncode == 0, result.stderr[-4000:]
        printed[name] = result.stdout
    evaluations = [r for r in read_metrics(runs["with"]) if "eval/fid" in r]
    assert [r["step"] for r in evaluations] == [3, 6]  # every 3 steps; the last step always
    assert all(f"eval/floor_{key}" in evaluations[0] for key in SAMPLE_KEYS)
    assert printed["with"].count("eval step") == 2 and "eval step" not in printed["without"]
    assert not any("eval/fid" in r for r in read_metrics(runs["without"]))
    assert training_records(runs["with"]) == training_records(runs["without"])
    samples = "samples/step_0000006.png"
    assert (runs["with"] / samples).read_bytes() == (runs["without"] / samples).read_bytes()


def test_vaegan_eval_prints_the_table_beside_the_floor_and_writes_json(exported, reference, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(eval_command, "Reference", lambda device: reference)  # reuse the test features
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long labels in a narrow terminal
    out = tmp_path / "eval.json"
    eval_command.main([str(exported), "--samples", "200", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "real data (floor)" in printed and "classifier-FID" in printed and "class histogram" in printed
    report = json.loads(out.read_text())
    assert (report["num_samples"], report["seed"]) == (200, tiny_config().seed)
    assert set(report["model"]) == MODEL_KEYS
    assert "reconstruction classifier-FID" in printed and "std of z, the dim farthest from 1" in printed
    assert report["floor"] == {key.removeprefix("floor_"): value for key, value in reference.floor(200).items()}


def test_vaegan_eval_rejects_too_few_samples(exported, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_command.main([str(exported), "--samples", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --samples must be at least 4 (precision and recall use 3 nearest " \
                                      "neighbours)\n"


def test_console_scripts_resolve_and_the_classifier_ships_as_package_data():
    pyproject = (REPO / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(vaegan-[a-z]+) = "([\w.]+:\w+)"$', pyproject, flags=re.MULTILINE))
    assert {"vaegan-train", "vaegan-eval", "vaegan-sample"} <= scripts.keys()
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(import_module(module), function))
    assert re.search(r'^vaegan_dist = \[.*"evaluation/classifier\.safetensors".*\]$', pyproject, flags=re.MULTILINE)


def test_reconstruction_scores_are_the_mean_error_and_the_mean_psnr():
    from vaegan_dist.evaluation.reconstruction import reconstruction_scores

    scores = reconstruction_scores(torch.tensor([0.01, 0.001, 0.0]))
    assert scores["recon_mse"] == pytest.approx(0.011 / 3)
    assert scores["recon_psnr"] == pytest.approx((20 + 30 + 100) / 3)  # a perfect reconstruction counts 100 dB
