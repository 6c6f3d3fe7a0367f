"""The VAE/GAN losses of Larsen et al. (2016) as pure functions of tensors.

Notation: x real images, x̃ = Dec(z) with z ~ q(z | x), x_p = Dec(z_p) with z_p ~ N(0, I).
  dis_loss = BCE(D(x̃), 0) + BCE(D(x_p), 0) + BCE(D(x), 1)
  rec      = mean((Dis_l(x̃) − Dis_l(x))²)
  dec_loss = γ·rec − dis_loss                       (minimax, the design)
           = γ·rec + BCE(D(x̃), 1) + BCE(D(x_p), 1)  (non_saturating)
  kld      = −½·Σ(1 + log σ² − μ² − σ²) / (B·784)
  enc_loss = kld + β·rec
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
    kld: Tensor
    rec: Tensor
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


def similarity_error(fake: Tensor, real: Tensor) -> Tensor:
    """rec: mean squared distance between Dis_l of reconstructions and of real images."""
    return (fake - real).pow(2).mean()


def vaegan_losses(
    mu: Tensor,
    logvar: Tensor,
    logits: tuple[Tensor, Tensor, Tensor],
    similarity: tuple[Tensor, Tensor],
    gamma: float,
    beta: float,
    generator_loss: str,
) -> LossTerms:
    """All losses from the networks' outputs.

    logits: D's logits for (x, x̃, x_p); similarity: Dis_l for (x, x̃).
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
    rec = similarity_error(dis_l_x_tilde, dis_l_x)
    kld = kl_divergence(upcast(mu), upcast(logvar))
    return LossTerms(
        enc_loss=kld + beta * rec,
        dec_loss=gamma * rec + gen_loss,
        dis_loss=dis_loss,
        kld=kld,
        rec=rec,
        dis_real_loss=dis_real,
        dis_recon_loss=dis_recon,
        dis_prior_loss=dis_prior,
        gen_loss=gen_loss,
        d_x=torch.sigmoid(logit_x.detach()).mean(),
        d_x_tilde=torch.sigmoid(logit_x_tilde.detach()).mean(),
        d_x_p=torch.sigmoid(logit_x_p.detach()).mean(),
    )
