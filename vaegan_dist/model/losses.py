"""The VAE/GAN losses of Larsen et al. (2016) as pure functions of tensors.

Notation: x real images, x̃ = Dec(z) with z ~ q(z | x), x_p = Dec(z_p) with z_p ~ N(0, I).
  dis_loss = BCE(D(x̃), 0) + BCE(D(x_p), 0) + BCE(D(x), 1)
  rec      = mean((Dis_l(x̃) − Dis_l(x))²)                     (the design)
           = mean((Dis_l(x̃) − Dis_l(x))²) / sg(mean(Dis_l(x)²))  (normalise_similarity)
  pixel    = mean((x̃ − x)²)                                    (on [-1, 1] pixels)
  dec_loss = γ·rec + λ_pix·pixel − dis_loss                       (minimax, the design)
           = γ·rec + λ_pix·pixel + BCE(D(x̃), 1) + BCE(D(x_p), 1)  (non_saturating)
  kld      = −½·Σ(1 + log σ² − μ² − σ²) / (B·P)       (P: pixels per image, C·H·W; 784 on MNIST)
  mismatch = mean over dims d of m_d² + (v_d − 1)², m_d and v_d the mean and variance of z_d over the batch
  enc_loss = λ_KL·kld + β·rec + λ_pix·pixel + λ_prior·mismatch
with λ_KL = kl_weight (1 in the design), λ_pix = pixel_weight and λ_prior = prior_match_weight (0 in the design);
sg is stop-gradient. mismatch is 0 when the batch's codes have the prior's first two moments: where the KL holds
each image's posterior near N(0, I), it holds the aggregate posterior, what the decoder sees, near what samples
draw from.
λ_KL = P weighs each image's KL in full against the per-pixel means; λ_KL = 1 with λ_pix = 1/(2s²) alone is
a Gaussian VAE with pixel variance s² (on [-1, 1] pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossTerms:
    """Every loss of one step and its parts (scalars), and the mean discriminator outputs."""

    enc_loss: Tensor
    dec_loss: Tensor
    dis_loss: Tensor
    kld: Tensor  # unweighted: enc_loss holds kl_weight·kld
    rec: Tensor  # the similarity term of enc_loss and dec_loss (normalised when normalise_similarity)
    pixel: Tensor  # mean((x̃ − x)²) on [-1, 1] pixels; in the losses only when pixel_weight > 0
    prior_mismatch: Tensor  # the batch's codes against N(0, I) in mean and variance; in enc_loss only when weighed
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


def kl_divergence(mu: Tensor, logvar: Tensor, image_pixels: int) -> Tensor:
    """KL(q(z | x) ‖ N(0, I)) summed over the batch, divided by B·P (P pixels per image) as in the design."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (mu.shape[0] * image_pixels)


def prior_mismatch(z: Tensor) -> Tensor:
    """mean_d(m_d² + (v_d − 1)²): the batch's codes z (B, latent_dim) against N(0, I) in each dimension's mean
    m_d and variance v_d (over the batch, uncorrected: defined, with finite gradients, for any B)."""
    mean = z.mean(dim=0)
    variance = (z - mean).pow(2).mean(dim=0)
    return (mean.pow(2) + (variance - 1).pow(2)).mean()


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


def generator_term(logit_x_tilde: Tensor, logit_x_p: Tensor, dis_loss: Tensor, generator_loss: str) -> Tensor:
    """The decoder's adversarial term: −dis_loss (minimax), or BCE(D(x̃), 1) + BCE(D(x_p), 1) (non_saturating)."""
    if generator_loss == "minimax":
        return -dis_loss
    if generator_loss == "non_saturating":
        return bce_with_logits(logit_x_tilde, 1.0) + bce_with_logits(logit_x_p, 1.0)
    raise ValueError(f"unknown generator_loss {generator_loss!r}")


def vaegan_losses(
    mu: Tensor,
    logvar: Tensor,
    logits: tuple[Tensor, Tensor, Tensor],
    similarity: tuple[Tensor, Tensor],
    gamma: float,
    beta: float,
    generator_loss: str,
    pixels: tuple[Tensor, Tensor],
    kl_weight: float = 1.0,
    pixel_weight: float = 0.0,
    normalise_similarity: bool = False,
    z: Tensor | None = None,
    prior_match_weight: float = 0.0,
) -> LossTerms:
    """All losses from the networks' outputs.

    logits: D's logits for (x, x̃, x_p); similarity: Dis_l for (x, x̃); pixels: (x, x̃), rows of C·H·W pixels;
    z: the codes x̃ was decoded from, needed when prior_match_weight > 0 (without it the mismatch is logged as 0).
    The defaults are the design.
    """
    logit_x, logit_x_tilde, logit_x_p = (upcast(t) for t in logits)
    dis_l_x, dis_l_x_tilde = (upcast(t) for t in similarity)
    dis_real, dis_recon, dis_prior = (bce_with_logits(logit, label) for logit, label in
                                      ((logit_x, 1.0), (logit_x_tilde, 0.0), (logit_x_p, 0.0)))
    dis_loss = dis_recon + dis_prior + dis_real
    gen_loss = generator_term(logit_x_tilde, logit_x_p, dis_loss, generator_loss)
    rec = similarity_error(dis_l_x_tilde, dis_l_x, normalise_similarity)
    kld = kl_divergence(upcast(mu), upcast(logvar), pixels[0].shape[1])
    if z is None and prior_match_weight:
        raise ValueError("prior_match_weight > 0 needs z")
    pixel = pixel_error(upcast(pixels[1]), upcast(pixels[0]))
    mismatch = rec.new_zeros(()) if z is None else prior_mismatch(upcast(z))
    enc_loss = kld + beta * rec if kl_weight == 1 else kl_weight * kld + beta * rec
    dec_loss = gamma * rec + gen_loss
    if pixel_weight:  # added only when on, so that the design's losses stay bit for bit as they were
        enc_loss = enc_loss + pixel_weight * pixel
        dec_loss = dec_loss + pixel_weight * pixel
    if prior_match_weight:  # likewise
        enc_loss = enc_loss + prior_match_weight * mismatch
    return LossTerms(
        enc_loss=enc_loss,
        dec_loss=dec_loss,
        dis_loss=dis_loss,
        kld=kld,
        rec=rec,
        pixel=pixel.detach() if not pixel_weight else pixel,
        prior_mismatch=mismatch.detach() if not prior_match_weight else mismatch,
        dis_l_power=dis_l_x.detach().pow(2).mean(),
        dis_real_loss=dis_real,
        dis_recon_loss=dis_recon,
        dis_prior_loss=dis_prior,
        gen_loss=gen_loss,
        d_x=torch.sigmoid(logit_x.detach()).mean(),
        d_x_tilde=torch.sigmoid(logit_x_tilde.detach()).mean(),
        d_x_p=torch.sigmoid(logit_x_p.detach()).mean(),
    )
