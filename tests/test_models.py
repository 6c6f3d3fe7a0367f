"""The networks' options that change what they compute."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import tiny_config
from vaegan_dist.models import build_models, eval_mode


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
