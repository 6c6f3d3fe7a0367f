"""The networks' options that change what they compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from vaegan_dist.model.dropout import Dropout
from vaegan_dist.model.networks import build_models, eval_mode


def discriminator_after_training_forwards(spectral_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    *_, discriminator = build_models(tiny_config(hidden_dim=64, spectral_norm=spectral_norm, dropout=0.0))
    for _ in range(50):  # with spectral norm, each training forward runs one power iteration
        discriminator(torch.rand(64, 784) * 2 - 1)
    return discriminator


def test_spectral_norm_divides_each_discriminator_weight_by_its_largest_singular_value():
    discriminator = discriminator_after_training_forwards(spectral_norm=True)
    for layer in (m for m in discriminator.modules() if isinstance(m, nn.Linear)):
        assert abs(torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() - 1) < 0.05


def test_only_with_spectral_norm_is_the_logit_blind_to_the_scale_of_the_weights():
    x = torch.rand(32, 784) * 2 - 1
    for spectral_norm in (True, False):
        discriminator = discriminator_after_training_forwards(spectral_norm)
        with eval_mode(discriminator):
            before = discriminator(x)
            for name, tensor in discriminator.state_dict().items():
                if name.endswith("weight.original" if spectral_norm else "weight"):
                    tensor.mul_(10.0)
            after = discriminator(x)
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-5) == spectral_norm


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_keeps_each_element_independently_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1001) + 1.0  # an odd count: the last int64 word is half used
    kept = Dropout(p)(x) != 0
    tolerance = 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < tolerance
    # Neighbours share a random word (32 bits each): their masks must still be independent.
    both = (kept.flatten()[:-1:2] & kept.flatten()[1::2]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 3 * tolerance


def test_cpu_dropout_scales_what_it_keeps_and_routes_the_gradient_through_the_same_mask():
    torch.manual_seed(0)
    x = (torch.rand(64, 300) + 1.0).requires_grad_()
    y = Dropout(0.25)(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * (1 / 0.75))


def test_cpu_dropout_draws_from_the_global_generator_and_is_off_in_eval_mode():
    dropout, x = Dropout(0.1), torch.rand(256, 256) + 1.0
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first)  # so a checkpoint's RNG state resumes the same masks
    assert not torch.equal(dropout(x), first)
    assert torch.equal(dropout.eval()(x), x)
