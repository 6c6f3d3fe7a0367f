"""One training step: one forward pass, each network's gradient from its own loss only, then all three steps.

This is Algorithm 1 of Larsen et al. (2016):
  encoder       ← ∇θEnc (kld + β·rec)
  decoder       ← ∇θDec (γ·rec − dis_loss)   (or the non-saturating decoder loss)
  discriminator ← ∇θDis dis_loss             (x̃ and x_p are constants to it; rec never reaches it)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from vaegan_dist.config import TrainConfig
from vaegan_dist.losses import LossTerms, vaegan_losses
from vaegan_dist.models import Networks


class RoutedGradients(dict[str, list[Tensor]]):
    """Each network's gradients (keys Networks._fields, lists in .parameters() order); `terms`, the losses of the
    pass."""

    def __init__(self, gradients: dict[str, list[Tensor]], terms: LossTerms) -> None:
        super().__init__(gradients)
        self.terms = terms


def forward_losses(networks: Networks, x: Tensor, eps: Tensor, z_p: Tensor, config: TrainConfig) -> LossTerms:
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

    x: images (B, 784) in [-1, 1]; eps, z_p: standard normal noise (B, latent_dim). The same gradients are
    left in each parameter's .grad, where DDP-wrapped networks have averaged them over processes.
    scale_loss multiplies each loss before its backward pass (fp16 loss scaling).
    """
    networks = Networks(encoder, decoder, discriminator)
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


def adam_optimizers(networks: Networks, config: TrainConfig) -> Networks:
    """One Adam per network, fused: one pass over the weights, gradients and moments per step, on the CPU
    as on the GPU (the default, one pass per operation and parameter, costs several times as much); capturable
    in a CUDA graph with --cuda-graphs."""
    return Networks(*(torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                       fused=True, capturable=config.cuda_graphs) for net in networks))


# The update guard. Finite gradients can still make Adam's update overflow a weight or a moment (a huge learning
# rate, a weight or moment near the float's limit, a bad optimizer state): such a step is skipped like one with
# non-finite gradients. Copying every weight and moment before each step, to undo one, would cost more than the
# Adam step itself, and so would reading them all to check. Instead the caller carries, from each step to the next,
# upper bounds on each optimizer's largest |weight|, |exp_avg| and exp_avg_sq, as numbers on the host (UpdateBounds):
# train_step returns them in its StepResult and takes them back at the next call. Given None (the first step, or
# after anything changed the weights or optimizer states outside the step: a resume, a test) it measures them, with
# fused reductions read in the step's one host synchronisation; given bounds, it carries them through
# Adam's arithmetic with the gradient norms that the synchronisation reads anyway: a few float operations in
# Python, nothing on the device. When they show that the update cannot overflow (always, in a healthy run) the step
# runs as it always did. Otherwise carried bounds are measured afresh and, if they still cannot rule an overflow
# out, every weight and state is copied, stepped, checked, and put back if any came out non-finite.

NON_FINITE_GRADIENTS = "non-finite losses or gradients"
NON_FINITE_UPDATE = "an update that would make a weight or an Adam moment non-finite"
ROUNDING = 1 + 2.0**-20  # per step: Adam's few float32 operations round by at most 2**-24 each


@dataclass(frozen=True)
class UpdateBounds:
    """Upper bounds on one optimizer's largest |weight|, |exp_avg| and exp_avg_sq."""

    weight: float
    exp_avg: float
    exp_avg_sq: float


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _moments(optimizer: torch.optim.Optimizer, key: str) -> list[Tensor]:
    return [optimizer.state[p][key] for p in _params(optimizer) if key in optimizer.state.get(p, {})]


def _measure(optimizers: Networks) -> Tensor:
    """(3, 3) on the device, a row per optimizer: its UpdateBounds, each the largest L2 norm of such a tensor; nan
    where a state breaks what Adam keeps (exp_avg_sq ≥ 0, step ≥ 0), which reads as unsafe."""
    rows = []
    for optimizer in optimizers:
        kinds = [_params(optimizer), _moments(optimizer, "exp_avg"), _moments(optimizer, "exp_avg_sq")]
        zero = kinds[0][0].new_zeros(())  # no moments before the first step
        row = torch.stack([torch.stack(torch._foreach_norm(kind)).amax() if kind else zero for kind in kinds])
        lowest = [t.amin().to(row) for t in kinds[2] + _moments(optimizer, "step")]
        rows.append(torch.where(torch.stack(lowest).amin() < 0, torch.nan, row) if lowest else row)
    return torch.stack(rows)


def bounds_after_step(optimizers: Networks, bounds: Networks, grad_norms: list[float]) -> tuple[Networks, bool]:
    """(each optimizer's UpdateBounds after Adam's next step, whether no number that step computes on any network
    can exceed a quarter of the float's largest value: False for nan). Reads the optimizers' settings only.

    With G the gradient norm (≥ every |g|), P, M, V the bounds before and, for each parameter group, s = lr/(1 − β1),
    which bounds the step size lr/(1 − β1^t) for t ≥ 1: the gradient with weight decay is at most g = G + wd·P, the
    moments at most m = max(M, g) and v = max(V, g²) (convex combinations), the denominator √v̂ + eps at least eps,
    the update at most s·m/eps and the new weights P + s·m/eps. The intermediates of torch's Adam implementations are
    at most m·max(1, s, 1/eps, s/eps) and v/(1 − β2); the quarter leaves room for rounding.
    """
    afters, safe = [], True
    for optimizer, before, grad_norm in zip(optimizers, bounds, grad_norms, strict=True):
        after, candidates = before, [before.weight, before.exp_avg, before.exp_avg_sq]
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            s, eps = float(group["lr"]) / (1 - beta1), group["eps"]
            per_eps = 1 / eps if eps > 0 else math.inf
            g = grad_norm + group["weight_decay"] * before.weight
            m = max(before.exp_avg, g) * ROUNDING
            v = max(before.exp_avg_sq, g * g) * ROUNDING
            p = (before.weight + m * s * per_eps) * ROUNDING
            after = UpdateBounds(max(after.weight, p), max(after.exp_avg, m), max(after.exp_avg_sq, v))
            candidates += [p, m * max(1.0, s, per_eps, s * per_eps), v / (1 - beta2)]
        limit = torch.finfo(optimizer.param_groups[0]["params"][0].dtype).max / 4
        safe = safe and all(x <= limit for x in candidates)  # nan <= limit is False
        afters.append(after)
    return Networks(*afters), safe


@torch.no_grad()
def step_or_undo(optimizers: Networks) -> bool:
    """The slow path, for a step whose bounds could not rule an overflow out: every optimizer steps, and if any
    weight or moment came out non-finite, every weight and optimizer state is put back bitwise (the weights in
    place, as the networks hold them) and the step is skipped (False)."""
    saved = [([p.clone() for p in _params(optimizer)],
              {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
               for p, state in optimizer.state.items()}) for optimizer in optimizers]
    try:
        for optimizer in optimizers:
            optimizer.step()
    except RuntimeError as err:  # torch's single-tensor Adam refuses a step size beyond the float, midway
        if "overflow" not in str(err):
            raise
    else:
        # Exactly (the largest |x|; an L2 norm can overflow on finite numbers), as this path is rare.
        largest = [torch.stack(torch._foreach_norm(_params(optimizer) + _moments(optimizer, "exp_avg") +
                                                   _moments(optimizer, "exp_avg_sq"), math.inf)).amax()
                   for optimizer in optimizers]
        if bool(torch.isfinite(torch.stack(largest)).all()):  # a second host synchronisation, on this path only
            return True
    for optimizer, (weights, states) in zip(optimizers, saved, strict=True):
        for p, weight in zip(_params(optimizer), weights, strict=True):
            p.copy_(weight)
        optimizer.state.clear()  # a state the step created goes too
        optimizer.state.update(states)
    return False


@dataclass(frozen=True)
class StepResult:
    terms: LossTerms
    grad_norms: Tensor  # (3,): each network's gradient norm, in Networks order, after unscaling
    stepped: bool  # False when every process skipped the step: see skip_reason
    skip_reason: str | None = None  # NON_FINITE_GRADIENTS or NON_FINITE_UPDATE when not stepped
    bounds: Networks | None = None  # each optimizer's UpdateBounds after the step, for the next (None: measure them)


def train_step(
    networks: Networks,
    optimizers: Networks,
    x: Tensor,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    bounds: Networks | None = None,
) -> StepResult:
    """One step of all three networks on images x (B, 784), with fresh noise from the global RNG.

    The optimizers are plain torch Adams. All three step, or none does: none when any gradient is not finite, or
    when the update would make any weight or moment non-finite (the update guard above). `bounds`: the previous
    step's result.bounds, valid only if nothing changed the weights or optimizer states since (else None). The
    gradients are already averaged over processes and the replicas' weights and moments are identical, so every
    process computes the same update and reaches the same verdict (where two took different paths of the guard, the
    fast one's bounds prove the update finite, which the slow one's check confirms). With fp16, every network is
    unscaled by the scale its loss was multiplied with, and the scale is updated once afterwards. (Accelerate's
    AcceleratedOptimizer.step updates the shared scaler after each optimizer, so the next one would be unscaled
    with a changed scale: it is not used.)
    """
    eps = torch.randn(x.shape[0], config.latent_dim, device=x.device)
    z_p = torch.randn_like(eps)
    grads = routed_gradients(*networks, x, eps, z_p, config,
                             scale_loss=scaler.scale if scaler is not None else None)
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    grad_norms = torch.stack([get_total_norm(grads[name]) for name in Networks._fields])
    measured = bounds is None
    if measured:  # read with the gradient norms: still the step's one host synchronisation
        norms, *rows = torch.cat([grad_norms[None], _measure(optimizers).to(grad_norms.dtype)]).tolist()
        bounds = Networks(*(UpdateBounds(*row) for row in rows))
    else:
        norms = grad_norms.tolist()
    skip_reason = None if all(map(math.isfinite, norms)) else NON_FINITE_GRADIENTS
    if skip_reason is None:
        after, safe = bounds_after_step(optimizers, bounds, norms)
        if not safe and not measured:  # carried bounds may be loose: measure them (a second synchronisation)
            fresh = Networks(*(UpdateBounds(*row) for row in _measure(optimizers).tolist()))
            after, safe = bounds_after_step(optimizers, fresh, norms)
        if safe:
            for optimizer in optimizers:
                optimizer.step()
            bounds = after
        else:
            bounds = None  # the next step measures
            skip_reason = None if step_or_undo(optimizers) else NON_FINITE_UPDATE
    if scaler is not None:
        scaler.update()
    return StepResult(grads.terms, grad_norms, skip_reason is None, skip_reason, bounds)
