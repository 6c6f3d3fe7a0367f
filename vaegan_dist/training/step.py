"""One training step: one forward pass, each network's gradient from its own loss only, then all three steps.

This is Algorithm 1 of Larsen et al. (2016):
  encoder       ← ∇θEnc (kld + β·rec)
  decoder       ← ∇θDec (γ·rec − dis_loss)   (or the non-saturating decoder loss)
  discriminator ← ∇θDis dis_loss             (x̃ and x_p are constants to it; rec never reaches it)

A step whose losses or gradients are not all finite changes nothing: all three networks step, or none does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from vaegan_dist.config import TrainConfig
from vaegan_dist.model.losses import LossTerms, vaegan_losses
from vaegan_dist.model.networks import PerNetwork


class RoutedGradients(dict[str, list[Tensor]]):
    """Each network's gradients (keys PerNetwork._fields, lists in .parameters() order); `terms`, the losses of the
    pass."""

    def __init__(self, gradients: dict[str, list[Tensor]], terms: LossTerms) -> None:
        super().__init__(gradients)
        self.terms = terms


def forward_losses(networks: PerNetwork, x: Tensor, eps: Tensor, z_p: Tensor, config: TrainConfig) -> LossTerms:
    """All losses from one pass: the decoder runs once on [z; z_p], the discriminator once on [x; x̃; x_p]."""
    batch = x.shape[0]
    mu, logvar = networks.encoder(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    x_tilde, x_p = networks.decoder(torch.cat([z, z_p])).split(batch)
    logits, dis_l = networks.discriminator(torch.cat([x, x_tilde, x_p]), with_similarity=True)
    logit_x, logit_x_tilde, logit_x_p = logits.split(batch)
    dis_l_x, dis_l_x_tilde, _ = dis_l.split(batch)
    return vaegan_losses(mu, logvar, (logit_x, logit_x_tilde, logit_x_p), (dis_l_x, dis_l_x_tilde),
                         config.gamma, config.beta, config.generator_loss, pixels=(x, x_tilde),
                         kl_weight=config.kl_weight, pixel_weight=config.pixel_weight,
                         normalise_similarity=config.normalise_similarity, z=z,
                         prior_match_weight=config.prior_match_weight)


def routed_gradients(
    encoder: nn.Module,
    decoder: nn.Module,
    discriminator: nn.Module,
    x: Tensor,
    eps: Tensor,
    z_p: Tensor,
    config: TrainConfig,
    *,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
) -> RoutedGradients:
    """The gradient of each network's own loss w.r.t. that network's parameters, from one forward pass.

    x: images as rows (B, C·H·W) in [-1, 1]; eps, z_p: standard normal noise (B, latent_dim). The same gradients are
    left in each parameter's .grad, where DDP-wrapped networks have averaged them over processes.
    scale_loss multiplies each loss before its backward pass (fp16 loss scaling).
    """
    networks = PerNetwork(encoder, decoder, discriminator)
    params = {name: list(net.parameters()) for name, net in networks._asdict().items()}
    for p in chain.from_iterable(params.values()):
        p.grad = None
    terms = forward_losses(networks, x, eps, z_p, config)
    scale = scale_loss or (lambda loss: loss)
    # `inputs=` restricts each backward pass to one network's parameters, so no loss leaks into another
    # network's gradient. It also lets each DDP wrapper all-reduce its network's gradient exactly once.
    scale(terms.enc_loss).backward(inputs=params["encoder"], retain_graph=True)
    scale(terms.dec_loss).backward(inputs=params["decoder"], retain_graph=True)
    scale(terms.dis_loss).backward(inputs=params["discriminator"])
    return RoutedGradients({name: [p.grad for p in ps] for name, ps in params.items()}, terms.detached())


def learning_rate(config: TrainConfig, step: int, last_step: int) -> float:
    """The learning rate of step `step` (counting from 0) of a run that ends after step `last_step`."""
    decay_start = config.lr_decay_start * last_step
    if config.lr_schedule == "constant" or step < decay_start:
        return config.lr
    return config.lr * (last_step - step) / (last_step - decay_start)


def adam_optimizers(networks: PerNetwork, config: TrainConfig) -> PerNetwork:
    """One Adam per network, fused: one pass over the weights, gradients and moments per step, on the CPU
    as on the GPU (the default, one pass per operation and parameter, costs several times as much); capturable
    in a CUDA graph with --cuda-graphs."""
    return PerNetwork(*(torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                       fused=True, capturable=config.cuda_graphs) for net in networks))


@dataclass(frozen=True)
class StepResult:
    terms: LossTerms
    grad_norms: Tensor  # (3,): each network's gradient norm, in PerNetwork order, after unscaling
    stepped: bool  # False when the step was skipped: a loss or gradient was not finite (on every process alike)


def step_on_device(
    networks: PerNetwork,
    optimizers: PerNetwork,
    x: Tensor,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    force_skip: bool = False,
) -> tuple[LossTerms, Tensor, Tensor]:
    """The step without a host synchronisation: (the losses, the gradient norms, whether all norms are finite as a
    0-d bool tensor). --cuda-graphs captures exactly this.

    (1) Noise from the global RNG, (2) the three routed gradients, (3) unscaled (fp16), (4) their norms, (5) three
    fused Adam steps, which the kernel skips when `found_inf` is 1 (a norm is not finite, or, with --gan-margin,
    the network rests: equilibrium_rests): weights and moments stay as they were and the step count is put back;
    a skipped step also puts the networks' buffers (batch norm's running statistics) back.
    force_skip skips whatever the gradients (a captured step's warm-up).
    With fp16, every network is unscaled by the scale its loss was multiplied with, and the scale is updated once
    afterwards (Accelerate's AcceleratedOptimizer.step would update the shared scaler after each optimizer, so the
    next one would be unscaled with a changed scale: it is not used).
    """
    eps = torch.randn(x.shape[0], config.latent_dim, device=x.device)
    z_p = torch.randn_like(eps)
    buffers = [buffer for network in networks for buffer in network.buffers()]
    before = [buffer.clone() for buffer in buffers]  # the forward pass moves batch norm's running statistics
    grads = routed_gradients(*networks, x, eps, z_p, config, scale_loss=scaler.scale if scaler is not None else None)
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    grad_norms = torch.stack([get_total_norm(grads[name]) for name in PerNetwork._fields])
    finite = torch.isfinite(grad_norms).all()
    skip = finite.logical_not() if not force_skip else torch.ones((), dtype=torch.bool, device=x.device)
    for buffer, saved in zip(buffers, before, strict=True):  # a skipped step keeps the statistics it had
        buffer.copy_(torch.where(skip, saved, buffer))
    found_inf = PerNetwork(*[skip.float()] * 3)  # 1: the fused kernel leaves the network as it was
    if config.gan_margin is not None:
        found_inf = PerNetwork(*((skip | rest).float() for rest in equilibrium_rests(grads.terms, config)))
    for optimizer, skipped in zip(optimizers, found_inf, strict=True):
        optimizer.found_inf = skipped  # read by Adam.step, handed to the fused kernel
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    if scaler is not None:
        scaler.update()
    return grads.terms, grad_norms, finite


def equilibrium_rests(terms: LossTerms, config: TrainConfig) -> PerNetwork:
    """Which networks rest this step, as 0-d bool tensors (never the encoder): with --gan-margin m, the paper's
    equilibrium rule (the authors' aegan.py, equilibrium e). With the discriminator's cost on real images,
    BCE(D(x), 1), and on generated ones, the mean of BCE(D(x̃), 0) and BCE(D(x_p), 0): the discriminator rests
    while either is below e − m (it is too far ahead), the decoder while either is above e + m; if both would,
    neither does. Without a margin (the design) no network rests."""
    never = torch.zeros((), dtype=torch.bool, device=terms.dis_loss.device)
    if config.gan_margin is None:
        return PerNetwork(never, never, never)
    low, high = config.gan_equilibrium - config.gan_margin, config.gan_equilibrium + config.gan_margin
    costs = torch.stack([terms.dis_real_loss, (terms.dis_recon_loss + terms.dis_prior_loss) / 2]).detach().float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # the costs of the whole batch, so that every process rests the same networks (gloo has no AVG)
        torch.distributed.all_reduce(costs)
        costs = costs / torch.distributed.get_world_size()
    decoder, discriminator = (costs > high).any(), (costs < low).any()
    both = decoder & discriminator
    return PerNetwork(never, decoder & ~both, discriminator & ~both)


def train_step(networks: PerNetwork, optimizers: PerNetwork, x: Tensor, config: TrainConfig,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One step of all three networks on images x (B, C·H·W), with fresh noise from the global RNG.

    The optimizers are plain torch Adams (adam_optimizers). The gradients are averaged over processes and the
    replicas are identical, so every process reaches the same verdict. Reads one number back from the device.
    """
    terms, grad_norms, finite = step_on_device(networks, optimizers, x, config, scaler)
    return StepResult(terms, grad_norms, bool(finite))
