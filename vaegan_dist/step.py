"""One training step: one forward pass, each network's gradient from its own loss only, then all three steps.

This is Algorithm 1 of Larsen et al. (2016):
  encoder       ← ∇θEnc (kld + β·rec)
  decoder       ← ∇θDec (γ·rec − dis_loss)   (or the non-saturating decoder loss)
  discriminator ← ∇θDis dis_loss             (x̃ and x_p are constants to it; rec never reaches it)
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, pairwise

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
                         normalise_similarity=config.normalise_similarity)


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
# Adam step itself, and so would reading them all to check. Instead each optimizer keeps upper bounds on its largest
# |weight|, |exp_avg| and exp_avg_sq, as numbers on the host: measured once (one fused reduction per network, read
# in the step's one host synchronisation), then carried from step to step through Adam's arithmetic with the
# gradient norms that the synchronisation reads anyway: a few float operations in Python, nothing on the device.
# When they show that the next update cannot overflow (always, in a healthy run) the step runs as it always did.
# Otherwise they are measured afresh and, if they still cannot rule an overflow out, every weight and state is
# copied, stepped, checked, and put back if any came out non-finite. Tensors changed outside the step (a resume, a
# state loaded or edited) have another identity or version counter, and their bounds are measured again. (Writes
# through `.data` bypass the counters: call forget_bounds after them.)

NON_FINITE_GRADIENTS = "non-finite losses or gradients"
NON_FINITE_UPDATE = "an update that would make a weight or an Adam moment non-finite"
ROUNDING = 1 + 2.0**-20  # per step: Adam's few float32 operations round by at most 2**-24 each
Bounds = tuple[float, float, float]  # ≥ max |weight|, max |exp_avg|, max exp_avg_sq of one optimizer


@dataclass
class _Known:
    bounds: Bounds
    refs: list[weakref.ref[Tensor]]  # the tensors bounded
    versions: list[int]  # their version counters then

    def same_tensors(self, tensors: list[Tensor]) -> bool:
        return len(tensors) == len(self.refs) and all(map(operator.is_, map(weakref.ref.__call__, self.refs), tensors))

    def hold_for(self, tensors: list[Tensor]) -> bool:
        return [t._version for t in tensors] == self.versions and self.same_tensors(tensors)


_KNOWN: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Known] = weakref.WeakKeyDictionary()


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _moments(optimizer: torch.optim.Optimizer, key: str) -> list[Tensor]:
    return [optimizer.state[p][key] for p in _params(optimizer) if key in optimizer.state.get(p, {})]


def _tracked(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The weights and every state tensor of the optimizer: what its bounds stand for. (The states in the state
    dict's order, which needs no hashing of tensors, a Python call each.)"""
    states = optimizer.state.values()
    return _params(optimizer) + [t for state in states for t in state.values() if isinstance(t, Tensor)]


def forget_bounds(optimizer: torch.optim.Optimizer) -> None:
    """Makes the next step measure the optimizer's weights and moments afresh."""
    _KNOWN.pop(optimizer, None)


def _known_bounds(optimizer: torch.optim.Optimizer) -> Bounds | None:
    known = _KNOWN.get(optimizer)
    return known.bounds if known is not None and known.hold_for(_tracked(optimizer)) else None


def _measure(optimizer: torch.optim.Optimizer) -> Tensor:
    """(3,) on the device: max |weight|, max |exp_avg|, max exp_avg_sq, each bounded by the largest L2 norm of a
    tensor (one fused reduction); nan where a state breaks what Adam keeps (exp_avg_sq ≥ 0, step ≥ 0): unsafe."""
    params, exp_avgs = _params(optimizer), _moments(optimizer, "exp_avg")
    exp_avg_sqs = _moments(optimizer, "exp_avg_sq")
    norms = torch.stack(torch._foreach_norm(params + exp_avgs + exp_avg_sqs))
    ends = [0, len(params), len(params) + len(exp_avgs), len(norms)]
    values = torch.stack([norms[a:b].amax() if b > a else norms.new_zeros(()) for a, b in pairwise(ends)])
    lowest = [t.amin().to(norms.device, norms.dtype) for t in exp_avg_sqs + _moments(optimizer, "step")]
    if lowest:
        values = torch.where(torch.stack(lowest).amin() < 0, torch.nan, values)
    return values


def _bounds_after_step(optimizer: torch.optim.Optimizer, before: Bounds, grad_norm: float) -> tuple[Bounds, bool]:
    """(the bounds after Adam's next step, whether no number that step computes can exceed a quarter of the float's
    largest value: False for nan).

    With G the gradient norm (≥ every |g|), P, M, V the bounds before and, for each parameter group, s = lr/(1 − β1),
    which bounds the step size lr/(1 − β1^t) for t ≥ 1: the gradient with weight decay is at most g = G + wd·P, the
    moments at most m = max(M, g) and v = max(V, g²) (convex combinations), the denominator √v̂ + eps at least eps,
    the update at most s·m/eps and the new weights P + s·m/eps. The intermediates of torch's Adam implementations are
    at most m·max(1, s, 1/eps, s/eps) and v/(1 − β2); the quarter leaves room for rounding.
    """
    weights, exp_avg, exp_avg_sq = before
    after, candidates = before, list(before)
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        s, eps = float(group["lr"]) / (1 - beta1), group["eps"]
        per_eps = 1 / eps if eps > 0 else math.inf
        g = grad_norm + group["weight_decay"] * weights
        m = max(exp_avg, g) * ROUNDING
        v = max(exp_avg_sq, g * g) * ROUNDING
        p = (weights + m * s * per_eps) * ROUNDING
        after = (max(after[0], p), max(after[1], m), max(after[2], v))
        candidates += [p, m * max(1.0, s, per_eps, s * per_eps), v / (1 - beta2)]
    limit = torch.finfo(optimizer.param_groups[0]["params"][0].dtype).max / 4
    return after, all(x <= limit for x in candidates)  # nan <= limit is False


def _plan(optimizers: Networks, befores: list[Bounds], grad_norms: list[float]) -> tuple[list[Bounds], bool]:
    """Each optimizer's bounds after the step, and whether the step is safe on every network."""
    planned = [_bounds_after_step(opt, before, norm) for opt, before, norm in zip(optimizers, befores, grad_norms,
                                                                                     strict=True)]
    return [after for after, _ in planned], all(safe for _, safe in planned)


def update_verdict(optimizers: Networks, grad_norms: Tensor) -> tuple[bool, bool, list[Bounds]]:
    """(whether every gradient is finite, whether the update is safe, each optimizer's bounds after it), from the
    step's one host synchronisation: the gradient norms, with the measurements of the optimizers whose bounds are
    not known. Where known bounds are too loose to call the update safe, they are measured (a second one)."""
    known = [_known_bounds(optimizer) for optimizer in optimizers]
    measured = [_measure(opt).to(grad_norms.dtype) for opt, bounds in zip(optimizers, known, strict=True)
                if bounds is None]
    values = torch.cat([grad_norms, *measured]).tolist()  # the host synchronisation
    count = len(optimizers)
    norms, fresh = values[:count], iter([tuple(values[i:i + 3]) for i in range(count, len(values), 3)])
    finite = all(math.isfinite(norm) for norm in norms)
    afters, safe = _plan(optimizers, [bounds or next(fresh) for bounds in known], norms)
    if finite and not safe and any(bounds is not None for bounds in known):
        remeasured = torch.stack([_measure(opt).to(grad_norms.dtype) for opt in optimizers]).tolist()
        afters, safe = _plan(optimizers, [tuple(bounds) for bounds in remeasured], norms)
    return finite, safe, afters


def remember_bounds(optimizers: Networks, afters: list[Bounds]) -> None:
    """After a step: its bounds, for the tensors as it left them."""
    for optimizer, after in zip(optimizers, afters, strict=True):
        tensors, known = _tracked(optimizer), _KNOWN.get(optimizer)
        refs = known.refs if known is not None and known.same_tensors(tensors) else [weakref.ref(t) for t in tensors]
        _KNOWN[optimizer] = _Known(after, refs, [t._version for t in tensors])


def _snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], dict[Tensor, dict[str, object]]]:
    params = _params(optimizer)
    states = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
              for p in params if p in optimizer.state}
    return [p.detach().clone() for p in params], states


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved: tuple[list[Tensor], dict[Tensor, dict[str, object]]]) -> None:
    """Puts back _snapshot's weights and states in place (whoever holds the tensors keeps them); a state the step
    created is dropped."""
    weights, states = saved
    for p, weight in zip(_params(optimizer), weights, strict=True):
        p.copy_(weight)
        if p not in states:
            optimizer.state.pop(p, None)
            continue
        for key, value in states[p].items():
            if isinstance(value, Tensor):
                optimizer.state[p][key].copy_(value)
            else:
                optimizer.state[p][key] = value


def step_or_undo(optimizers: Networks) -> bool:
    """The slow path, for a step whose bounds could not rule an overflow out: every optimizer steps, and if any
    weight or moment came out non-finite, every weight and optimizer state is put back bitwise and the step is
    skipped (False)."""
    saved = [_snapshot(optimizer) for optimizer in optimizers]
    try:
        for optimizer in optimizers:
            forget_bounds(optimizer)
            optimizer.step()
    except RuntimeError as err:  # torch's single-tensor Adam refuses a step size beyond the float, midway
        if "overflow" not in str(err):
            raise
    else:
        # Exactly (the largest |x|; an L2 norm can overflow on finite numbers), as this path is rare.
        largest = [torch.stack(torch._foreach_norm(_params(optimizer) + _moments(optimizer, "exp_avg") +
                                                   _moments(optimizer, "exp_avg_sq"), float("inf"))).amax()
                   for optimizer in optimizers]
        if bool(torch.isfinite(torch.stack(largest)).all()):  # a second host synchronisation, on this path only
            return True
    for optimizer, state in zip(optimizers, saved, strict=True):
        _restore(optimizer, state)
    return False


@dataclass(frozen=True)
class StepResult:
    terms: LossTerms
    grad_norms: Tensor  # (3,): each network's gradient norm, in Networks order, after unscaling
    stepped: bool  # False when every process skipped the step: see skip_reason
    skip_reason: str | None = None  # NON_FINITE_GRADIENTS or NON_FINITE_UPDATE when not stepped


def train_step(
    networks: Networks,
    optimizers: Networks,
    x: Tensor,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One step of all three networks on images x (B, 784), with fresh noise from the global RNG.

    The optimizers are plain torch Adams. All three step, or none does: none when any gradient is not finite, or
    when the update would make any weight or moment non-finite (the update guard above). The gradients are already
    averaged over processes and the replicas' weights and moments are identical, so every process computes the
    same update and reaches the same verdict (where two took different paths of the guard, the fast one's bounds
    prove the update finite, which the slow one's check confirms). With fp16, every network is unscaled by the scale
    its loss was multiplied with, and the scale is updated once afterwards. (Accelerate's
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
    finite, safe, afters = update_verdict(optimizers, grad_norms)
    skip_reason = None if finite else NON_FINITE_GRADIENTS
    if finite and safe:
        for optimizer in optimizers:
            optimizer.step()
        remember_bounds(optimizers, afters)
    elif finite and not step_or_undo(optimizers):
        skip_reason = NON_FINITE_UPDATE
    if scaler is not None:
        scaler.update()
    return StepResult(grads.terms, grad_norms, skip_reason is None, skip_reason)
