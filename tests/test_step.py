"""Gradient routing (Algorithm 1 of Larsen et al.) and the optimizer phase, against an independent formulation."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tests import forked
from tests.conftest import tiny_config, tiny_flags
from vaegan_dist.model.losses import LossTerms, prior_mismatch
from vaegan_dist.model.networks import PerNetwork, build_models
from vaegan_dist.training.step import (
    adam_optimizers,
    equilibrium_rests,
    learning_rate,
    routed_gradients,
    train_step,
)

BATCH = 12


def make_inputs(config, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 784, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(BATCH, config.latent_dim, generator=g, dtype=dtype)
    z_p = torch.randn(BATCH, config.latent_dim, generator=g, dtype=dtype)
    return x, eps, z_p


def reference_gradients(encoder, decoder, discriminator, x, eps, z_p, config, batched=False):
    """Each network's gradient by plain autograd.grad on its own loss, written out from the paper.

    Separate forward passes per network's loss, and the discriminator sees detached fakes. Without `batched`, each
    batch (x, x̃, x_p; z, z_p) also goes through each network alone; with it, they go together as in the step, which
    batch norm needs (its statistics are the batch's).
    """
    def each(network, *batches):
        if not batched:
            return [network(batch) for batch in batches]
        return list(network(torch.cat(batches)).split(BATCH))

    def discriminate(x_tilde, x_p):
        """(the logits, and Dis_l of x̃ and x)."""
        features = each(discriminator.body, x, x_tilde, x_p)
        logits = [discriminator.out(f) for f in features] if not batched else list(
            discriminator.out(torch.cat(features)).split(BATCH))
        dis_l = logits if config.similarity == "logit" else features
        return logits, dis_l[1], dis_l[0]

    ones, zeros = torch.ones(BATCH, 1, dtype=x.dtype), torch.zeros(BATCH, 1, dtype=x.dtype)
    bce = F.binary_cross_entropy_with_logits

    def losses(x_tilde, x_p, mu, logvar):
        (d_x, d_x_tilde, d_x_p), dis_l_x_tilde, dis_l_x = discriminate(x_tilde, x_p)
        dis = bce(d_x_tilde, zeros) + bce(d_x_p, zeros) + bce(d_x, ones)
        rec = ((dis_l_x_tilde - dis_l_x) ** 2).mean()
        if config.normalise_similarity:
            rec = rec / (dis_l_x ** 2).mean().detach()
        pixel = config.pixel_weight * ((x_tilde - x) ** 2).mean()
        kld = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / (BATCH * 784)
        if config.generator_loss == "minimax":
            dec = config.gamma * rec - dis
        else:
            dec = config.gamma * rec + bce(d_x_tilde, ones) + bce(d_x_p, ones)
        return dis, dec + pixel, config.kl_weight * kld + config.beta * rec + pixel

    mu, logvar = encoder(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    _, dec_loss, enc_loss = losses(*each(decoder, z, z_p), mu, logvar)
    mismatch = z.mean(dim=0) ** 2 + (torch.var(z, dim=0, correction=0) - 1) ** 2  # the batch against N(0, I)
    enc_loss = enc_loss + config.prior_match_weight * mismatch.mean()
    g_enc = torch.autograd.grad(enc_loss, list(encoder.parameters()), retain_graph=True)
    g_dec = torch.autograd.grad(dec_loss, list(decoder.parameters()))

    with torch.no_grad():
        mu, logvar = encoder(x)
        x_tilde, x_p = each(decoder, mu + eps * torch.exp(0.5 * logvar), z_p)
    dis_loss, _, _ = losses(x_tilde, x_p, mu, logvar)
    g_dis = torch.autograd.grad(dis_loss, list(discriminator.parameters()))
    return {"encoder": g_enc, "decoder": g_dec, "discriminator": g_dis}


AUTOENCODER_TERMS = {"kl_weight": 30.0, "pixel_weight": 7.0, "normalise_similarity": True, "prior_match_weight": 3.0}


@pytest.mark.parametrize("similarity", ["logit", "hidden"])
@pytest.mark.parametrize("generator_loss", ["minimax", "non_saturating"])
@pytest.mark.parametrize("terms", [{}, AUTOENCODER_TERMS], ids=["design", "autoencoder_terms"])
def test_routed_gradients_match_independent_formulation(similarity, generator_loss, terms):
    config = tiny_config(similarity=similarity, generator_loss=generator_loss, dropout=0.0, **terms)
    torch.manual_seed(1)
    networks = [net.double() for net in build_models(config)]
    x, eps, z_p = make_inputs(config)

    routed = routed_gradients(*networks, x, eps, z_p, config)
    expected = reference_gradients(*networks, x, eps, z_p, config)

    assert set(routed) == set(PerNetwork._fields)
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        assert len(routed[name]) == len(list(net.parameters()))
        for got, want in zip(routed[name], expected[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            assert want.abs().max() > 0  # a zero gradient would make the comparison vacuous


def test_minimax_decoder_keeps_its_adversarial_term():
    """The design's own code left the decoder with exactly γ·∇rec; correct routing does not."""
    config = tiny_config(generator_loss="minimax", dropout=0.0)
    torch.manual_seed(2)
    encoder, decoder, discriminator = (net.double() for net in build_models(config))
    x, eps, z_p = make_inputs(config)
    routed = routed_gradients(encoder, decoder, discriminator, x, eps, z_p, config)
    terms = routed.terms
    # 0-d float64 tensors: compare them as tensors (pytest.approx of a tensor is an error since pytest 9.2),
    # with approx's former tolerances (rel 1e-12, abs 1e-12), same dtype and shape.
    torch.testing.assert_close(terms.dec_loss, config.gamma * terms.rec - terms.dis_loss, rtol=1e-12, atol=1e-12)
    assert terms.dec_loss.dtype == torch.float64 and terms.dis_loss.abs() > 1e-3  # a term that does not vanish

    mu, logvar = encoder(x)
    x_tilde = decoder(mu + eps * torch.exp(0.5 * logvar))
    rec = ((discriminator.similarity(x_tilde) - discriminator.similarity(x)) ** 2).mean()
    gamma_rec_grads = torch.autograd.grad(config.gamma * rec, list(decoder.parameters()))
    difference = max((a - b).abs().max() for a, b in zip(routed["decoder"], gamma_rec_grads, strict=True))
    assert difference > 1e-6


def test_autoencoder_terms_are_logged_and_weighted_as_documented():
    x, eps, z_p = make_inputs(tiny_config())
    torch.manual_seed(4)
    networks = [net.double() for net in build_models(tiny_config(dropout=0.0))]
    design = routed_gradients(*networks, x, eps, z_p, tiny_config(dropout=0.0)).terms
    terms = routed_gradients(*networks, x, eps, z_p, tiny_config(dropout=0.0, **AUTOENCODER_TERMS)).terms
    # The same pass: kld, the pixel error and the prior mismatch do not depend on the settings; rec is divided by
    # mean(Dis_l(x)²).
    assert terms.kld == design.kld and terms.pixel == design.pixel > 0 and terms.dis_l_power == design.dis_l_power
    assert terms.prior_mismatch == design.prior_mismatch > 0
    # (as tensors: pytest 9.2's approx rejects 0-d tensors)
    torch.testing.assert_close(terms.rec, design.rec / design.dis_l_power, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.enc_loss, 30 * terms.kld + 5 * terms.rec + 7 * terms.pixel
                               + 3 * terms.prior_mismatch, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.dec_loss, 25 * terms.rec + terms.gen_loss + 7 * terms.pixel, rtol=1e-12, atol=0)
    assert design.enc_loss == design.kld + 5 * design.rec  # the design, bit for bit
    assert design.dec_loss == 25 * design.rec + design.gen_loss


def test_prior_mismatch_is_zero_for_the_prior_and_grows_with_a_shifted_or_narrow_batch():
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert prior_mismatch(z) < 1e-4
    # mean over dims of m² + (v − 1)²: a shift of 0.5 in every dimension adds 0.25; a spread of 0.5 adds (0.25 − 1)².
    torch.testing.assert_close(prior_mismatch(z + 0.5), torch.tensor(0.25, dtype=z.dtype), rtol=0, atol=1e-2)
    torch.testing.assert_close(prior_mismatch(0.5 * z), torch.tensor(0.5625, dtype=z.dtype), rtol=0, atol=1e-2)
    one = torch.zeros(1, 4, requires_grad=True)  # one image per process: defined, with a finite gradient
    prior_mismatch(one).backward()
    assert prior_mismatch(one.detach()) == 1 and torch.isfinite(one.grad).all()


def test_routed_gradients_are_left_in_grad_and_replace_old_ones():
    config = tiny_config(dropout=0.0)
    networks = [net.double() for net in build_models(config)]
    for p in networks[2].parameters():
        p.grad = torch.full_like(p, 1e6)  # stale gradients must not leak into the result
    routed = routed_gradients(*networks, *make_inputs(config), config)
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        for p, g in zip(net.parameters(), routed[name], strict=True):
            assert p.grad is g
    assert all(g.abs().max() < 1e5 for g in routed["discriminator"])


def state_of(networks):
    return [p.detach().clone() for net in networks for p in net.parameters()]


def test_fp16_loss_scaling_unscales_every_network_with_the_scale_of_its_backward_pass():
    """A power-of-two loss scale is exact: the scaled step must equal the unscaled step bit for bit."""
    config = tiny_config(dropout=0.0)
    torch.manual_seed(3)
    plain = build_models(config)
    scaled = copy.deepcopy(plain)
    x = make_inputs(config, dtype=torch.float32)[0]
    # growth_interval=1: the scale changes after every successful step, so an update between the three
    # optimizers would unscale the later ones by the wrong scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)

    torch.manual_seed(4)
    result_plain = train_step(plain, adam_optimizers(plain, config), x, config)
    torch.manual_seed(4)
    result_scaled = train_step(scaled, adam_optimizers(scaled, config), x, config, scaler)

    assert result_plain.stepped and result_scaled.stepped
    for a, b in zip(state_of(plain), state_of(scaled), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(result_plain.grad_norms, result_scaled.grad_norms, rtol=0, atol=0)
    assert scaler.get_scale() == 2048.0  # updated once per step, not once per optimizer


def assert_no_step_taken(optimizers):
    """Each optimizer is as a fresh Adam: no state, or (a skipped first step) zero moments at step 0."""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            assert not any(value.count_nonzero() for value in state.values()), state


def test_fp16_overflow_skips_all_three_networks_and_backs_off_once():
    config = tiny_config(dropout=0.0)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    before = state_of(networks)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1)  # overflows float32 grads

    result = train_step(networks, optimizers, make_inputs(config, dtype=torch.float32)[0], config, scaler)

    assert not result.stepped
    assert not torch.isfinite(result.grad_norms).all()
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(networks), strict=True))
    assert_no_step_taken(optimizers)  # Adam's moments untouched too
    assert scaler.get_scale() == 2.0**126


def test_non_finite_batch_skips_the_step_without_a_scaler():
    config = tiny_config(dropout=0.0)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    before = state_of(networks)
    x = make_inputs(config, dtype=torch.float32)[0]
    x[3, 7] = float("nan")

    result = train_step(networks, optimizers, x, config)

    assert not result.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(networks), strict=True))
    good = train_step(networks, optimizers, make_inputs(config, dtype=torch.float32)[0], config)
    assert good.stepped
    assert not all(torch.equal(a, b) for a, b in zip(before, state_of(networks), strict=True))


def optimizer_states(optimizers):
    """Every tensor of every optimizer's state (moments and step counts), copied, by (network, parameter, key)."""
    return {(network, index, key): value.clone() for network, optimizer in enumerate(optimizers)
            for index, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]


def plain_step(networks, optimizers, x, config):
    """train_step's step written plainly: the gradients (with train_step's noise draws), then every optimizer."""
    eps = torch.randn(x.shape[0], config.latent_dim)
    routed_gradients(*networks, x, eps, torch.randn_like(eps), config)
    for optimizer in optimizers:
        optimizer.step()


def test_train_step_is_a_plain_adam_step_bitwise_and_a_skipped_step_changes_nothing():
    """The fused kernel's found_inf changes no number of a step that goes through, and a skipped step (a NaN pixel)
    leaves every weight, moment and step count as it was, so the steps after it match plain ones bitwise."""
    config = tiny_config(dropout=0.0)
    torch.manual_seed(6)
    stepped = build_models(config)
    plain = copy.deepcopy(stepped)
    stepped_opts, plain_opts = adam_optimizers(stepped, config), adam_optimizers(plain, config)
    for index in range(4):
        x = make_inputs(config, dtype=torch.float32, seed=index)[0]
        if index == 2:
            x[0, 0] = float("nan")
            weights, states = state_of(stepped), optimizer_states(stepped_opts)
        torch.manual_seed(index)
        result = train_step(stepped, stepped_opts, x, config)
        assert result.stepped == (index != 2)
        if index == 2:
            assert all(torch.equal(a, b) for a, b in zip(weights, state_of(stepped), strict=True))
            assert_same_states(states, optimizer_states(stepped_opts))
            continue
        torch.manual_seed(index)
        plain_step(plain, plain_opts, x, config)
        assert all(torch.equal(a, b) for a, b in zip(state_of(stepped), state_of(plain), strict=True)), index
    assert_same_states(optimizer_states(stepped_opts), optimizer_states(plain_opts))


def test_learning_rate_is_constant_then_falls_linearly_to_zero_at_the_last_step():
    constant = tiny_config(lr=1e-3)
    linear = tiny_config(lr=1e-3, lr_schedule="linear", lr_decay_start=0.5)
    assert [learning_rate(constant, step, 100) for step in (0, 50, 99)] == [1e-3] * 3
    assert [learning_rate(linear, step, 100) for step in (0, 49, 50, 75)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    assert learning_rate(linear, 99, 100) == pytest.approx(1e-3 / 50)


def test_the_training_loop_applies_the_schedule_and_the_discriminator_scale(tmp_path):
    flags = tiny_flags(max_steps=10, log_every=5, lr=1e-3, lr_schedule="linear", discriminator_lr_scale=3,
                       output_dir=tmp_path / "run")
    result = forked.run("vaegan_dist.train", flags, tmp_path / "logs", env=forked.default_env(ACCELERATE_USE_CPU="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # logged after step s: the rate steps 0..s-1 ran with, the last of them s-1; decay starts at step 5 of 10
    for name, scale in (("encoder", 1), ("decoder", 1), ("discriminator", 3)):
        lrs = {r["step"]: r[f"lr_{name}"] for r in records if f"lr_{name}" in r}
        assert lrs == pytest.approx({5: scale * 1e-3, 10: scale * 1e-3 / 5}), name


def losses_with(real: float, recon: float, prior: float) -> LossTerms:
    zero = {name: torch.tensor(0.0) for name in LossTerms.names()}
    return dataclasses.replace(LossTerms(**zero), dis_real_loss=torch.tensor(real),
                               dis_recon_loss=torch.tensor(recon), dis_prior_loss=torch.tensor(prior))


@pytest.mark.parametrize(("costs", "rests"), [
    ((0.5, 0.5, 0.5), (False, False)),  # within 0.68 ± 0.35: everyone steps
    ((0.2, 0.5, 0.5), (False, True)),  # D too good on real images: it rests
    ((0.5, 0.1, 0.1), (False, True)),  # ... or on generated ones (their mean)
    ((1.2, 0.5, 0.5), (True, False)),  # D far behind: the decoder rests
    ((0.2, 1.3, 1.3), (False, False)),  # both would: neither does
])
def test_the_equilibrium_rule_rests_the_network_that_is_too_far_ahead(costs, rests):
    got = equilibrium_rests(losses_with(*costs), tiny_config(gan_margin=0.35))
    assert (bool(got.encoder), bool(got.decoder), bool(got.discriminator)) == (False, *rests)
    assert not any(equilibrium_rests(losses_with(*costs), tiny_config()))  # the design: no margin


def test_a_resting_discriminator_keeps_its_weights_and_adam_state_while_the_others_step():
    config = tiny_config(dropout=0.0, gan_margin=0.5, gan_equilibrium=10.0)  # every cost is below 9.5: D rests
    torch.manual_seed(7)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    before = [p.detach().clone() for p in networks.discriminator.parameters()]
    decoder_before = [p.detach().clone() for p in networks.decoder.parameters()]
    assert train_step(networks, optimizers, make_inputs(config, dtype=torch.float32)[0], config).stepped
    assert all(torch.equal(a, b) for a, b in zip(before, networks.discriminator.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(decoder_before, networks.decoder.parameters(), strict=True))
    assert_no_step_taken([optimizers.discriminator])
