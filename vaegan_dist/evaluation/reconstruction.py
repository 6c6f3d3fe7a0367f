"""How well the networks reconstruct held-out images, for any data set: the error of Dec(μ(x)) against x.

  recon_mse   mean over the images of the mean squared error per pixel, on [0, 1] pixels
  recon_psnr  mean over the images of 10·log10(1 / that error), in dB (higher is better)
On MNIST the evaluation is the classifier's (vaegan_dist.evaluation.scores, whose recon_mse is the same error);
on a folder of images it is these.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vaegan_dist.evaluation.scores import share
from vaegan_dist.model.networks import eval_mode

BATCH = 500
MIN_ERROR = 1e-10  # a perfect reconstruction's PSNR: 100 dB, not infinity


def squared_errors(encoder: nn.Module, decoder: nn.Module, pixels: Tensor) -> Tensor:
    """Each image's mean squared error on [0, 1] pixels, (N,), of pixel rows (N, C·H·W) in [-1, 1]."""
    with eval_mode(encoder, decoder):
        errors = [((decoder(encoder(part)[0]).float() - part.float()) / 2).square().mean(dim=1)
                  for part in pixels.split(BATCH)]
    return torch.cat(errors) if errors else pixels.new_zeros(0)


def reconstruction_scores(errors: Tensor) -> dict[str, float]:
    return {"recon_mse": errors.mean().item(),
            "recon_psnr": (-10 * torch.log10(errors.clamp(min=MIN_ERROR))).mean().item()}


def evaluate_reconstructions(accelerator: Accelerator, encoder: nn.Module, decoder: nn.Module, pixels: Tensor,
                             num_images: int) -> dict[str, float]:
    """The scores of the first num_images held-out images, each process reconstructing its share; on the main
    process ({} elsewhere). Call it on every process at the same point."""
    pixels = pixels[:num_images]
    errors = accelerator.gather(squared_errors(encoder, decoder, share(pixels, accelerator)))
    return reconstruction_scores(errors[:len(pixels)]) if accelerator.is_main_process else {}


def reconstruction_line(step: int, scores: dict[str, float]) -> str:
    return f"eval step {step:>7} | recon mse {scores['recon_mse']:.5f} psnr {scores['recon_psnr']:.2f} dB"
