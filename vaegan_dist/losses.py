"""The VAE/GAN losses of Larsen et al. (2016) as pure functions of tensors.

Notation: x real images, x̃ = Dec(z) with z ~ q(z | x), x_p = Dec(z_p) with z_p ~ N(0, I).
  dis_loss = BCE(D(x̃), 0) + BCE(D(x_p), 0) + BCE(D(x), 1)
  rec      = mean((Dis_l(x̃) − Dis_l(x))²)                     (the design)
           = mean((Dis_l(x̃) − Dis_l(x))²) / sg(mean(Dis_l(x)²))  (normalise_similarity)
  pixel    = mean((x̃ − x)²)                                    (on [-1, 1] pixels)
  dec_loss = γ·rec + λ_pix·pixel − dis_loss                       (minimax, the design)
           = γ·rec + λ_pix·pixel + BCE(D(x̃), 1) + BCE(D(x_p), 1)  (non_saturating)
  kld      = −½·Σ(1 + log σ² − μ² − σ²) / (B·784)
  enc_loss = λ_KL·kld + β·rec + λ_pix·pixel
with λ_KL = kl_weight (1 in the design) and λ_pix = pixel_weight (0 in the design); sg is stop-gradient.
λ_KL = 784 weighs each image's KL in full against the per-pixel means; λ_KL = 1 with λ_pix = 1/(2s²) alone is
a Gaussian VAE with pixel variance s² (on [-1, 1] pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from vaegan_dist.models import IMAGE_PIXELS


@dataclass(frozen=True)
class LossTerms:
    """Every loss of one step and its parts (scalars), and the mean discriminator outputs."""

    enc_loss: Tensor
    dec_loss: Tensor
    dis_loss: Tensor
    kld: Tensor  # unweighted: enc_loss holds kl_weight·kld
    rec: Tensor  # the similarity term of enc_loss and dec_loss (normalised when normalise_similarity)
    pixel: Tensor  # mean((x̃ − x)²) on [-1, 1] pixels; in the losses only when pixel_weight > 0
    dis_l_power: Tensor  # mean(Dis_l(x)²), the scale of the similarity features (rec's divisor when normalised)
    dis_real_loss: Tensor  # BCE(D(x), 1)
    dis_recon_loss: Tensor  # BCE(D(x̃), 0)
    dis_prior_loss: Tensor  # BCE(D(x_p), 0)
    gen_loss: Tensor  # the decoder's adversarial term: −dis_loss, or the non-saturating BCEs
    d_x: Tensor  # mean D(x)
    d_x_tilde: Tensor  # mean D(x̃)
    d_x_p: Tensor  # mean D(x_p)

    def detached(self) -> LossTerms:
        return LossTerms(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def stacked(self) -> Tensor:
        """All terms in one float32 vector (field order), for one reduction across processes."""
        return torch.stack([getattr(self, f.name).detach().float() for f in fields(self)])

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(LossTerms)]


def upcast(t: Tensor) -> Tensor:
    """t in float32 at least: losses of half-precision outputs are computed in float32, float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z | x) ‖ N(0, I)) summed over the batch, divided by B·784 as in the design."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (mu.shape[0] * IMAGE_PIXELS)


def bce_with_logits(logits: Tensor, target: float) -> Tensor:
    """Mean binary cross-entropy of sigmoid(logits) against a constant label."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def similarity_error(fake: Tensor, real: Tensor, normalise: bool = False) -> Tensor:
    """rec: mean squared distance between Dis_l of reconstructions and of real images; with normalise, divided by
    the mean square of Dis_l(x), detached (a relative error: it does not grow as D's features sharpen)."""
    error = (fake - real).pow(2).mean()
    return error / real.detach().pow(2).mean().clamp(min=1e-12) if normalise else error


def pixel_error(fake: Tensor, real: Tensor) -> Tensor:
    """pixel: mean squared distance between reconstructions and real images, per pixel."""
    return (fake - real).pow(2).mean()


def vaegan_losses(
    mu: Tensor,
    logvar: Tensor,
    logits: tuple[Tensor, Tensor, Tensor],
    similarity: tuple[Tensor, Tensor],
    gamma: float,
    beta: float,
    generator_loss: str,
    pixels: tuple[Tensor, Tensor] | None = None,
    kl_weight: float = 1.0,
    pixel_weight: float = 0.0,
    normalise_similarity: bool = False,
) -> LossTerms:
    """All losses from the networks' outputs.

    logits: D's logits for (x, x̃, x_p); similarity: Dis_l for (x, x̃); pixels: (x, x̃), needed when
    pixel_weight > 0 (without them the pixel term is logged as 0). The defaults are the design.
    """
    logit_x, logit_x_tilde, logit_x_p = (upcast(t) for t in logits)
    dis_l_x, dis_l_x_tilde = (upcast(t) for t in similarity)
    dis_real = bce_with_logits(logit_x, 1.0)
    dis_recon = bce_with_logits(logit_x_tilde, 0.0)
    dis_prior = bce_with_logits(logit_x_p, 0.0)
    dis_loss = dis_recon + dis_prior + dis_real
    if generator_loss == "minimax":
        gen_loss = -dis_loss
    elif generator_loss == "non_saturating":
        gen_loss = bce_with_logits(logit_x_tilde, 1.0) + bce_with_logits(logit_x_p, 1.0)
    else:
        raise ValueError(f"unknown generator_loss {generator_loss!r}")
    rec = similarity_error(dis_l_x_tilde, dis_l_x, normalise_similarity)
    kld = kl_divergence(upcast(mu), upcast(logvar))
    if pixels is None:
        if pixel_weight:
            raise ValueError("pixel_weight > 0 needs pixels=(x, x̃)")
        pixel = rec.new_zeros(())
    else:
        x, x_tilde = (upcast(t) for t in pixels)
        pixel = pixel_error(x_tilde, x)
    enc_loss = kld + beta * rec if kl_weight == 1 else kl_weight * kld + beta * rec
    dec_loss = gamma * rec + gen_loss
    if pixel_weight:  # added only when on, so that the design's losses stay bit for bit as they were
        enc_loss = enc_loss + pixel_weight * pixel
        dec_loss = dec_loss + pixel_weight * pixel
    return LossTerms(
        enc_loss=enc_loss,
        dec_loss=dec_loss,
        dis_loss=dis_loss,
        kld=kld,
        rec=rec,
        pixel=pixel.detach() if not pixel_weight else pixel,
        dis_l_power=dis_l_x.detach().pow(2).mean(),
        dis_real_loss=dis_real,
        dis_recon_loss=dis_recon,
        dis_prior_loss=dis_prior,
        gen_loss=gen_loss,
        d_x=torch.sigmoid(logit_x.detach()).mean(),
        d_x_tilde=torch.sigmoid(logit_x_tilde.detach()).mean(),
        d_x_p=torch.sigmoid(logit_x_p.detach()).mean(),
    )
