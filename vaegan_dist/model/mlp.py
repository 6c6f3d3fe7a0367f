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

import torch
from torch import Tensor, nn

from vaegan_dist.model.discriminator import Discriminator


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU; GPUs keep PyTorch's fused kernel.

    On the CPU, nn.Dropout's bernoulli_ costs ~9 ns an element: the slowest elementwise work of a step (11% of
    it). Here each element takes 32 bits of int64 words drawn from the same generator, two elements a word
    (~3 ns), and is kept when they lie at or above p·2³², so with probability 1 − p to within 2⁻³³; what is
    kept is scaled by 1 / (1 − p), as before.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        words = torch.empty((x.numel() + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits
        bits = words.view(torch.int32)[: x.numel()].view(x.shape)  # uniform over [-2³¹, 2³¹)
        keep = bits >= round(self.p * 2**32) - 2**31
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


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
