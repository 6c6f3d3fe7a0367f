"""One training step: one forward pass, each network's gradient from its own loss only, then all three steps.

This is Algorithm 1 of Larsen et al. (2016):
  encoder       ← ∇θEnc (kld + β·rec)
  decoder       ← ∇θDec (γ·rec − dis_loss)   (or the non-saturating decoder loss)
  discriminator ← ∇θDis dis_loss             (x̃ and x_p are constants to it; rec never reaches it)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from itertools import chain

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import get_total_norm
from torch.optim import Optimizer

from vaegan_dist.config import TrainConfig
from vaegan_dist.losses import LossTerms, vaegan_losses

NETWORKS = ("encoder", "decoder", "discriminator")


class RoutedGradients(dict[str, list[Tensor]]):
    """Each network's gradients (keys NETWORKS, lists in .parameters() order); `terms`, the losses of the pass."""

    def __init__(self, gradients: dict[str, list[Tensor]], terms: LossTerms) -> None:
        super().__init__(gradients)
        self.terms = terms


def forward_losses(
    encoder: nn.Module,
    decoder: nn.Module,
    discriminator: nn.Module,
    x: Tensor,
    eps: Tensor,
    z_p: Tensor,
    config: TrainConfig,
) -> LossTerms:
    """All losses from one forward pass: the encoder on x, the decoder on z and z_p, the discriminator on x, x̃, x_p.

    Each batch goes through a network on its own rather than concatenated with the others: the products are
    the same, but each becomes its own autograd node, so a backward pass computes only the rows its loss
    reaches (the encoder's loss, for one, needs the discriminator's input gradient for x̃ alone).
    """
    mu, logvar = encoder(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    x_tilde, x_p = decoder(z), decoder(z_p)
    logit_x, dis_l_x = discriminator(x, with_similarity=True)
    logit_x_tilde, dis_l_x_tilde = discriminator(x_tilde, with_similarity=True)
    logit_x_p = discriminator(x_p)
    return vaegan_losses(mu, logvar, (logit_x, logit_x_tilde, logit_x_p), (dis_l_x, dis_l_x_tilde),
                         config.gamma, config.beta, config.generator_loss)


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
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> RoutedGradients:
    """The gradient of each network's own loss w.r.t. that network's parameters, from one forward pass.

    x: images (B, 784) in [-1, 1]; eps, z_p: standard normal noise (B, latent_dim). The same gradients are
    left in each parameter's .grad, averaged over the processes when there are several. scale_loss multiplies
    each loss before its backward pass (fp16 loss scaling). The forward pass runs inside autocast() (mixed
    precision: Accelerator.autocast): one region for all of it, so each weight is cast to half precision once
    per step, not once per batch that goes through it.
    """
    networks = (encoder, decoder, discriminator)
    params = {name: list(net.parameters()) for name, net in zip(NETWORKS, networks, strict=True)}
    for p in chain.from_iterable(params.values()):
        p.grad = None
    scale = scale_loss or (lambda loss: loss)
    averaging = []
    with ExitStack() as no_sync:
        # DDP would all-reduce each network's gradient inside its backward pass and wait for it there; instead
        # the average starts after the pass and runs while the next pass computes.
        for net in networks:
            if isinstance(net, DistributedDataParallel):
                no_sync.enter_context(net.no_sync())
        with autocast():
            terms = forward_losses(encoder, decoder, discriminator, x, eps, z_p, config)
        # `inputs=` restricts each backward pass to one network's parameters, so no loss leaks into another
        # network's gradient. The discriminator's, the smallest, goes last: its average overlaps nothing.
        for name, loss in zip(NETWORKS, (terms.enc_loss, terms.dec_loss, terms.dis_loss), strict=True):
            scale(loss).backward(inputs=params[name], retain_graph=name != "discriminator")
            averaging.append(start_averaging([p.grad for p in params[name]]))
    for wait in averaging:
        wait()
    return RoutedGradients({name: [p.grad for p in ps] for name, ps in params.items()}, terms.detached())


def start_averaging(grads: list[Tensor]) -> Callable[[], None]:
    """Starts averaging `grads` over all processes; the function returned waits until they hold the average.

    A network's gradients travel as one flat tensor, in one asynchronous all-reduce: on the CPU this beats
    both DDP's buckets and one all-reduce per tensor.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lambda: None
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(1 / dist.get_world_size())
    work = dist.all_reduce(flat, async_op=True)

    def wait() -> None:
        work.wait()
        for g, average in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(average.view_as(g))

    return wait


def adam_optimizers(networks: Sequence[nn.Module], config: TrainConfig) -> list[torch.optim.Adam]:
    """One Adam per network, fused: one pass over the weights, gradients and moments per step, on the CPU
    as on the GPU (the default, one pass per operation and parameter, costs several times as much)."""
    return [torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             fused=True) for net in networks]


@dataclass(frozen=True)
class StepResult:
    terms: LossTerms
    grad_norms: Tensor  # (3,): each network's gradient norm, NETWORKS order, after unscaling
    stepped: bool  # False when a non-finite gradient made every process skip the step


def train_step(
    networks: Sequence[nn.Module],
    optimizers: Sequence[Optimizer],
    x: Tensor,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> StepResult:
    """One step of all three networks on images x (B, 784), with fresh noise from the global RNG.

    The optimizers are plain torch optimizers, in NETWORKS order. All three step, or, when any gradient is
    not finite, none does. The gradients are already averaged over processes, so every process reaches the
    same verdict. With fp16, every network is unscaled by the scale its loss was multiplied with, and the
    scale is updated once afterwards. (Accelerate's AcceleratedOptimizer.step updates the shared scaler
    after each optimizer, so the next one would be unscaled with a changed scale: it is not used.)
    """
    encoder, decoder, discriminator = networks
    eps = torch.randn(x.shape[0], config.latent_dim, device=x.device)
    z_p = torch.randn_like(eps)
    grads = routed_gradients(encoder, decoder, discriminator, x, eps, z_p, config,
                             scale_loss=scaler.scale if scaler is not None else None, autocast=autocast)
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    grad_norms = torch.stack([get_total_norm(grads[name]) for name in NETWORKS])
    stepped = bool(torch.isfinite(grad_norms).all())
    if stepped:
        for optimizer in optimizers:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    return StepResult(grads.terms, grad_norms, stepped)
