"""How well the networks reconstruct held-out images, for any data set: the error of Dec(μ(x)) against x.

  recon_mse   mean over the images of the mean squared error per pixel, on [0, 1] pixels
  recon_psnr  mean over the images of 10·log10(1 / that error), in dB (higher is better)
On MNIST the evaluation is the classifier's (vaegan_dist.evaluation.scores, whose recon_mse is the same error);
on other images it is these, and the FID of samples against the held-out images where Inception can be had
(vaegan_dist.evaluation.inception).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vaegan_dist.evaluation.batches import StopCheck, batches
from vaegan_dist.evaluation.inception import FIDUnavailable, SampleFID, inception_fid
from vaegan_dist.evaluation.scores import prior_samples, share
from vaegan_dist.model.networks import eval_mode, images_to_pixels

BATCH = 500
MIN_ERROR = 1e-10  # a perfect reconstruction's PSNR: 100 dB, not infinity


def squared_errors(encoder: nn.Module, decoder: nn.Module, pixels: Tensor,
                   stop_requested: StopCheck | None = None) -> Tensor:
    """Each image's mean squared error on [0, 1] pixels, (N,), of pixel rows (N, C·H·W) in [-1, 1]."""
    with eval_mode(encoder, decoder):
        errors = [((decoder(encoder(part)[0]).float() - part.float()) / 2).square().mean(dim=1)
                  for part in batches(pixels, BATCH, stop_requested)]
    return torch.cat(errors) if errors else pixels.new_zeros(0)


def reconstruction_scores(errors: Tensor) -> dict[str, float]:
    return {"recon_mse": errors.mean().item(),
            "recon_psnr": (-10 * torch.log10(errors.clamp(min=MIN_ERROR))).mean().item()}


@dataclass
class HeldOut:
    """A run's held-out images to reconstruct, as pixel rows (N, C·H·W) in [-1, 1], and (on the main process,
    where Inception can be had) the FID of samples against every held-out image."""

    pixels: Tensor
    sample_fid: SampleFID | None = None


def held_out_images(test_images: Tensor, count: int, device: torch.device | str,
                    warn: Callable[[str], None] | None) -> HeldOut:
    """The first `count` of the held-out images (uint8 (N, C, H, W)) to reconstruct, on device; and, given `warn`
    (the process that scores), the FID of samples against all of them, or `warn` saying why FID is off."""
    held_out = HeldOut(images_to_pixels(test_images[:count]).to(device))
    if warn is not None:
        try:
            held_out.sample_fid = SampleFID(test_images, inception_fid(), device)
        except FIDUnavailable as err:
            warn(str(err))
    return held_out


def evaluate_images(accelerator: Accelerator | None, encoder: nn.Module, decoder: nn.Module, held_out: HeldOut,
                    num_samples: int, latent_dim: int, seed: int,
                    stop_requested: StopCheck | None = None, z: Tensor | None = None) -> dict[str, float]:
    """The reconstruction scores of the first num_samples held-out images, each process reconstructing its share,
    and the FID of num_samples samples (of z, else of z ~ N(0, I) seeded with seed), on the main process ({}
    elsewhere). Call it on every process at the same point (accelerator None: this process alone); stop_requested
    as in evaluate_distributed (the main process's FID is not checked: no other process runs it)."""
    pixels = held_out.pixels[:num_samples]
    if accelerator is None:
        errors = squared_errors(encoder, decoder, pixels)
    else:
        errors = accelerator.gather(squared_errors(encoder, decoder, share(pixels, accelerator), stop_requested))
        if not accelerator.is_main_process:
            return {}
    scores = reconstruction_scores(errors[:len(pixels)])
    if held_out.sample_fid is not None:
        z = prior_samples(num_samples, latent_dim, seed) if z is None else z
        scores["fid"] = held_out.sample_fid(decoder, z.to(pixels.device))
    return scores


def reconstruction_line(step: int, scores: dict[str, float]) -> str:
    fid = f" | fid {scores['fid']:.3f}" if "fid" in scores else ""
    return f"eval step {step:>7} | recon mse {scores['recon_mse']:.5f} psnr {scores['recon_psnr']:.2f} dB{fid}"
