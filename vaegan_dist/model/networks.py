"""The three networks as one value (PerNetwork), built from the config; the encoder's and the decoder's moving
averages (Autoencoder); pixel conversion and eval mode, which every reader of the networks shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vaegan_dist.config import TrainConfig
from vaegan_dist.model.conv import ConvDecoder, ConvEncoder, ConvShape, conv_discriminator
from vaegan_dist.model.mlp import Decoder, Encoder, mlp_discriminator


class PerNetwork(NamedTuple):
    """One thing per network, in the step's order: the modules themselves, their optimizers, their gradients.
    (Not Generic: a generic NamedTuple needs Python 3.11.)"""

    encoder: Any
    decoder: Any
    discriminator: Any


def build_models(config: TrainConfig) -> PerNetwork:
    """The encoder, decoder and discriminator as the config describes them, freshly initialised."""
    if config.architecture == "conv":
        shape = ConvShape(config.image_shape, config.conv_width)
        return PerNetwork(ConvEncoder(shape, config.latent_dim, config.encoder_batch_norm),
                          ConvDecoder(shape, config.latent_dim),
                          conv_discriminator(shape, config.similarity, config.network_dropout("discriminator"),
                                             config.spectral_norm))
    return PerNetwork(
        Encoder(config.image_pixels, config.hidden_dim, config.depth, config.latent_dim,
                config.network_dropout("encoder")),
        Decoder(config.image_pixels, config.hidden_dim, config.depth, config.latent_dim,
                config.network_dropout("decoder")),
        mlp_discriminator(config.image_pixels, config.hidden_dim, config.depth,
                          config.network_dropout("discriminator"), config.similarity, config.spectral_norm),
    )


def compile_networks(networks: PerNetwork) -> None:
    """torch.compile each network in place (its state_dict keys stay as they are).

    The routed step backpropagates through each compiled graph up to three times (retain_graph=True), which
    a compiled backward allows only when it may not reuse ("donate") its saved buffers: donation is turned off
    for the process.
    """
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    for net in networks:
        net.compile()


class Autoencoder(NamedTuple):
    """An encoder and its decoder: the trained pair, or the pair of their moving averages (--ema-decay)."""

    encoder: Any
    decoder: Any


def moving_averages(config: TrainConfig, networks: PerNetwork) -> Autoencoder:
    """Frozen copies of the encoder and the decoder, in eval mode, to hold the moving averages of their weights.
    They are built on the meta device, so making them draws nothing from the RNG (and copies none of
    Accelerate's wrapping of the networks)."""
    with torch.device("meta"):
        copies = build_models(config)
    for name in Autoencoder._fields:
        state = getattr(networks, name).state_dict()
        getattr(copies, name).load_state_dict({key: t.detach().clone() for key, t in state.items()}, assign=True)
    return Autoencoder(*(getattr(copies, name).requires_grad_(False).eval() for name in Autoencoder._fields))


@torch.no_grad()
def update_averages(averages: Autoencoder, networks: PerNetwork, decay: float, step: int) -> None:
    """average ← d·average + (1 − d)·network for the encoder and the decoder, with d = min(decay, (1 + step) /
    (10 + step)): the early weights, soon meaningless, leave the averages quickly. Both follow the same
    schedule, so that the averaged decoder decodes what the averaged encoder encodes. Buffers (batch norm's
    running statistics) are not averaged but copied: they describe the trained networks' activations."""
    d = min(decay, (1 + step) / (10 + step))
    averaged = [p for name in Autoencoder._fields for p in getattr(averages, name).parameters()]
    trained = [p for name in Autoencoder._fields for p in getattr(networks, name).parameters()]
    torch._foreach_lerp_(averaged, trained, 1 - d)
    for name in Autoencoder._fields:
        for average, buffer in zip(getattr(averages, name).buffers(), getattr(networks, name).buffers(), strict=True):
            average.copy_(buffer)


def images_to_pixels(images: Tensor) -> Tensor:
    """uint8 images (B, C, H, W) or (B, H, W) to float rows (B, C·H·W) in [-1, 1], matching tanh."""
    return images.reshape(images.shape[0], -1).float().div_(127.5).sub_(1.0)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Dropout off and no autograd inside; each module's previous mode is restored on exit."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
