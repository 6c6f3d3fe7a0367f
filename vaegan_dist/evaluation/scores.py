"""Sample quality of an encoder/decoder pair, measured with the shipped MNIST classifier against the test set.

From the classifier's penultimate features of N samples x_p = Dec(z_p), z_p ~ N(0, I), against those of the
10k test images: classifier-FID, KID, precision and recall (k = 3), the inception score and the class
histogram. From the first min(N, 10k) test images and their reconstructions Dec(μ(x)): the pixel MSE (on
[0, 1] pixels), the classifier's accuracy on the reconstructions, and their classifier-FID against the test
images (recon_fid, the same features as the samples' FID); and the aggregate posterior of the encoder over
those images (sample_statistics.aggregate_posterior: |mean of μ|, the standard deviation of z = μ + σ·ε per dimension,
the mean σ). Every result carries the real-data floor under `floor_<metric>`: the same metrics for N training
images in place of the samples (and the classifier's accuracy on the real test images; for recon_fid, the
training images' FID), because classifier-FID means nothing across classifiers or sample sizes.

`Reference` holds the classifier and the test set's features, computed once per process (a few seconds on a
CPU) and reused by every evaluation of a run; the floor is computed once per sample count. Nothing is
cached on disk. Samples come from a torch.Generator seeded with the given seed, and dropout is off, so an
evaluation draws nothing from the global RNG: training continues exactly as without it.

The command `vaegan-eval` is vaegan_dist.eval_command.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vaegan_dist.config import MIN_EVAL_SAMPLES, TrainConfig
from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.batches import StopCheck, batches
from vaegan_dist.evaluation.classifier import Classifier, accuracy, embed, load_classifier
from vaegan_dist.evaluation.statistics import (
    aggregate_posterior,
    class_histogram,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
)
from vaegan_dist.model.networks import eval_mode, images_to_pixels

DEFAULT_SAMPLES = 10_000
BATCH = 1000
K_NEAREST = 3  # precision and recall: the k of the k-NN manifolds
FLOOR_SEED = 0  # which training images stand in for samples in the floor: fixed, so the floor is a constant


class Reference:
    """The classifier and the test set on one device, with the test features and the floor computed on demand."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.classifier: Classifier = load_classifier(self.device)
        images, labels = load_mnist(None, "test")
        self.test_pixels = images_to_pixels(images).to(self.device)
        self.test_labels = labels.long().to(self.device)
        self._floors: dict[int, dict[str, float]] = {}

    @cached_property
    def test_features(self) -> Tensor:
        return embed(self.classifier, self.test_pixels)[0]

    @cached_property
    def test_radii(self) -> Tensor:
        """The radius of each test image's ball in the k-NN manifold of the test features."""
        return knn_radii(self.test_features, K_NEAREST)

    def sample_metrics(self, features: Tensor, probs: Tensor) -> dict[str, float]:
        """FID, KID, precision, recall, inception score and class histogram of samples against the test set."""
        precision, recall = precision_recall(self.test_features, features, K_NEAREST, self.test_radii)
        kid_subsets = torch.Generator().manual_seed(0)  # a fixed choice of subsets, not the global RNG
        return {
            "fid": frechet_distance(self.test_features, features),
            "kid": kernel_inception_distance(self.test_features, features, generator=kid_subsets),
            "precision": precision,
            "recall": recall,
            "inception_score": inception_score(probs),
            **{f"class_{c}": share for c, share in enumerate(class_histogram(probs).tolist())},
        }

    def floor(self, num_samples: int) -> dict[str, float]:
        """The metrics of num_samples training images in place of samples, and as recon_accuracy the
        classifier's accuracy on the test images that evaluate() reconstructs."""
        if num_samples not in self._floors:
            images, _ = load_mnist(None, "train")
            chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(FLOOR_SEED))
            pixels = images_to_pixels(images[chosen[:num_samples]]).to(self.device)
            metrics = self.sample_metrics(*embed(self.classifier, pixels))
            self._floors[num_samples] = {
                **metrics,
                "recon_accuracy": accuracy(self.classifier, self.test_pixels[:num_samples],
                                           self.test_labels[:num_samples]),
                "recon_fid": metrics["fid"],
            }
        return self._floors[num_samples]


def prior_samples(num_samples: int, latent_dim: int, seed: int) -> Tensor:
    """z_p ~ N(0, I) of shape (num_samples, latent_dim) on the CPU, from a generator of its own."""
    return torch.randn(num_samples, latent_dim, generator=torch.Generator().manual_seed(seed))


def posterior_noise(num_test: int, latent_dim: int, seed: int) -> Tensor:
    """ε ~ N(0, I) for z = μ + σ·ε of the first num_test test images: a generator of its own, seeded seed + 1
    (not the samples' stream)."""
    return prior_samples(num_test, latent_dim, seed + 1)


def embed_samples(decoder: nn.Module, reference: Reference, z: Tensor,
                  stop_requested: StopCheck | None = None) -> tuple[Tensor, Tensor]:
    """(features, probs) of the samples Dec(z), dropout off."""
    with eval_mode(decoder):
        samples = torch.cat([decoder(part.to(reference.device)).float()
                             for part in batches(z, BATCH, stop_requested)])
    return embed(reference.classifier, samples)


def reconstruct_test(encoder: nn.Module, decoder: nn.Module, reference: Reference, test_index: Tensor,
                     stop_requested: StopCheck | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Of the reconstructions Dec(μ(x)) of the test images test_index, one row per image: the squared error
    on [0, 1] pixels, correct (1.0 or 0.0), the classifier's features; and the encoder's μ and log σ²."""
    index = test_index.to(reference.device)
    x = reference.test_pixels[index]
    with eval_mode(encoder, decoder):
        posterior = [encoder(part) for part in batches(x, BATCH, stop_requested)]
        mu = torch.cat([m.float() for m, _ in posterior])
        logvar = torch.cat([v.float() for _, v in posterior])
        x_tilde = torch.cat([decoder(part).float() for part in batches(mu, BATCH, stop_requested)])
    features, probs = embed(reference.classifier, x_tilde)
    correct = (probs.argmax(dim=1) == reference.test_labels[index]).float()
    return ((x_tilde - x) / 2).square().mean(dim=1), correct, features, mu, logvar


def score(features: Tensor, probs: Tensor, squared_error: Tensor, correct: Tensor, recon_features: Tensor,
          mu: Tensor, logvar: Tensor, eps: Tensor, reference: Reference) -> dict[str, float]:
    """The metrics, and the floor for as many samples under floor_<metric>."""
    return {**reference.sample_metrics(features, probs),
            "recon_mse": squared_error.mean().item(),
            "recon_accuracy": correct.mean().item(),
            "recon_fid": frechet_distance(reference.test_features, recon_features),
            **aggregate_posterior(mu, logvar, eps.to(mu.device)),
            **{f"floor_{name}": value for name, value in reference.floor(len(features)).items()}}


def check_num_samples(num_samples: int) -> None:
    if num_samples < MIN_EVAL_SAMPLES:
        raise ValueError(f"evaluation needs at least {MIN_EVAL_SAMPLES} samples (k-NN with k = 3), "
                         f"not {num_samples}")


def evaluate(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, num_samples: int = DEFAULT_SAMPLES,
             reference: Reference | None = None, seed: int | None = None, z: Tensor | None = None) -> dict[str, float]:
    """All metrics and their floor (floor_<metric>), from num_samples samples and the first min(num_samples, 10k)
    test images, on the device of the networks. The samples decode z (num_samples codes), else z ~ N(0, I) seeded
    with `seed`, else config.seed; `seed` also seeds the posterior's noise."""
    check_num_samples(num_samples)
    seed = config.seed if seed is None else seed
    z = prior_samples(num_samples, config.latent_dim, seed) if z is None else z
    if z.shape != (num_samples, config.latent_dim):
        raise ValueError(f"z of shape {tuple(z.shape)}: evaluate needs ({num_samples}, {config.latent_dim})")
    reference = reference or Reference(next(decoder.parameters()).device)
    num_test = min(num_samples, len(reference.test_pixels))
    squared_error, correct, recon_features, mu, logvar = reconstruct_test(encoder, decoder, reference,
                                                                          torch.arange(num_test))
    return score(*embed_samples(decoder, reference, z), squared_error, correct, recon_features, mu, logvar,
                 posterior_noise(num_test, config.latent_dim, seed), reference)


def share(rows: Tensor, accelerator: Accelerator) -> Tensor:
    """This process's contiguous share of rows, zero-padded to ⌈N / processes⌉ rows so every share has one shape.

    Gathered in process order, the shares give back the N rows first, then the padding."""
    size = math.ceil(len(rows) / accelerator.num_processes)
    mine = rows[accelerator.process_index * size: (accelerator.process_index + 1) * size]
    return torch.cat([mine, mine.new_zeros(size - len(mine), *rows.shape[1:])])


def evaluate_distributed(accelerator: Accelerator, encoder: nn.Module, decoder: nn.Module, config: TrainConfig,
                         num_samples: int, reference: Reference | None = None,
                         stop_requested: StopCheck | None = None) -> dict[str, float]:
    """evaluate() split over the processes: each generates and embeds its share of the samples (the same z as
    one process would draw, seeded with config.seed) and reconstructs its share of the test images; the main
    process gathers the results and computes the metrics. Returns them on the main process, {} elsewhere.

    encoder and decoder are the unwrapped networks; call it on every process at the same point. Before each batch
    that every process runs, stop_requested() (agreed over the processes) may end it (EvaluationStopped).
    """
    check_num_samples(num_samples)
    reference = reference or Reference(accelerator.device)
    z = prior_samples(num_samples, config.latent_dim, config.seed)
    num_test = min(num_samples, len(reference.test_pixels))
    features, probs = embed_samples(decoder, reference, share(z, accelerator), stop_requested)
    recon = reconstruct_test(encoder, decoder, reference, share(torch.arange(num_test), accelerator), stop_requested)
    features, probs, *recon = accelerator.gather((features, probs, *recon))
    if not accelerator.is_main_process:
        return {}
    return score(features[:num_samples], probs[:num_samples], *(rows[:num_test] for rows in recon),
                 posterior_noise(num_test, config.latent_dim, config.seed), reference)


# (key, label, format) of the table's rows: the sample metrics, then the reconstruction metrics.
SAMPLE_ROWS = [("fid", "classifier-FID ↓", "{:.3f}"), ("kid", "KID ↓", "{:.5f}"),
               ("precision", "precision ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
               ("inception_score", "inception score ↑", "{:.3f}")]
RECON_ROWS = [("recon_mse", "reconstruction MSE ↓", "{:.5f}"),
              ("recon_accuracy", "reconstruction accuracy ↑", "{:.2%}"),
              ("recon_fid", "reconstruction classifier-FID ↓", "{:.3f}")]
# The aggregate posterior over the reconstructed test images, beside the prior's value.
LATENT_ROWS = [("latent_mean_abs", "|mean of μ|, mean over dims", "{:.3f}", 0.0),
               ("latent_std_mean", "std of z, mean over dims", "{:.3f}", 1.0),
               ("latent_std_worst", "std of z, the dim farthest from 1", "{:.3f}", 1.0),
               ("latent_std_min", "std of z, smallest", "{:.3f}", 1.0),
               ("latent_std_max", "std of z, largest", "{:.3f}", 1.0),
               ("latent_sigma", "mean σ", "{:.3f}", None)]


def evaluation_line(step: int, scores: dict[str, float]) -> str:
    """One console line for an evaluation during training, each figure beside its floor."""
    figures = " | ".join(f"{key} {form.format(scores[key])} ({form.format(scores[f'floor_{key}'])})"
                         for key, _, form in SAMPLE_ROWS)
    return (f"eval step {step:>7} | {figures} | recon mse {scores['recon_mse']:.5f} "
            f"acc {scores['recon_accuracy']:.2%} fid {scores['recon_fid']:.3f} | z |mean| "
            f"{scores['latent_mean_abs']:.3f} std {scores['latent_std_mean']:.3f} (worst "
            f"{scores['latent_std_worst']:.3f}) σ {scores['latent_sigma']:.3f} | (real-data floor in brackets)")
