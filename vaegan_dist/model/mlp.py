"""The three networks of the VAE/GAN: fully connected, with Dropout before every linear layer, on rows of P
pixels (C·H·W; 784 on MNIST).

With the default sizes (hidden_dim 1024, depth 3, latent_dim 20) on MNIST they are the project's design:
  encoder        784→1024→1024→1024 → 20 (μ) and 20 (log σ²)
  decoder        20→1024→1024→1024→784, tanh
  discriminator  784→1024→512→256→1, logit (the sigmoid belongs in the loss)
with LeakyReLU(0.2) after every hidden layer.
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from vaegan_dist.model.discriminator import Discriminator
from vaegan_dist.model.dropout import Dropout


def mlp(widths: list[int], dropout: float) -> nn.Sequential:
    """Dropout → Linear → LeakyReLU(0.2) for each consecutive pair of widths."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [Dropout(dropout), nn.Linear(fan_in, fan_out), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, image_pixels: int, hidden_dim: int, depth: int, latent_dim: int, dropout: float) -> None:
        super().__init__()
        self.body = mlp([image_pixels] + [hidden_dim] * depth, dropout)
        self.head_dropout = Dropout(dropout)
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z | x) for images x of shape (B, P)."""
        h = self.head_dropout(self.body(x))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self, image_pixels: int, hidden_dim: int, depth: int, latent_dim: int, dropout: float) -> None:
        super().__init__()
        self.body = mlp([latent_dim] + [hidden_dim] * depth, dropout)
        self.out = nn.Sequential(Dropout(dropout), nn.Linear(hidden_dim, image_pixels), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        """Images of shape (B, P) in [-1, 1]."""
        return self.out(self.body(z))


def mlp_discriminator(image_pixels: int, hidden_dim: int, depth: int, dropout: float, similarity: str,
                      spectral_norm: bool = False) -> Discriminator:
    """Layers halving from hidden_dim; Dis_l 'hidden' is the last hidden layer."""
    return Discriminator(mlp([image_pixels] + [hidden_dim >> i for i in range(depth)], dropout),
                         nn.Sequential(Dropout(dropout), nn.Linear(hidden_dim >> (depth - 1), 1)),
                         similarity, spectral_norm)
