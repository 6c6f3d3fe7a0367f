"""The paper's convolutional networks (Larsen et al. 2016; the authors' `img64x64` and `img32x32`), at `width`
times the paper's channel and unit counts. Like the fully connected networks they take and give images as rows
of C·H·W pixels in [-1, 1], and reshape inside.

For images of even side s (decoded at the next multiple of 8, s' ≥ s, and its centre cropped to s), 5×5 kernels:
  encoder        3 × [conv stride 2 → BN → ReLU]: 64, 128, 256 channels (s/8 × s/8 maps); FC 1024 → BN → ReLU;
                 μ and log σ² (linear); the same without BN (and with biases) where batch_norm is off
  decoder        FC to 256 × s/8 × s/8 → BN → ReLU; 3 × [transposed conv stride 2 → BN → ReLU]: 256, 128, 32
                 channels; conv to the image's channels; tanh
  discriminator  conv 32 → ReLU; 3 × [conv stride 2 → BN → ReLU]: 128, 256, 256 channels, the last block's
                 output being Dis_l, the learned similarity (the authors' recon_depth 9); FC 512 → BN → ReLU;
                 FC 1, the logit; dropout before each of its layers where the discriminator's dropout is set
                 (the paper's has none)
Images of side 32 or less take the 32×32 variant: 192 where the 64×64 one has 256 in the middle layers (the
decoder's first and the discriminator's second block). The convolutions before a batch norm have no bias.
Batch norm: see docs/architecture.md, "Batch norm".
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaegan_dist.model.discriminator import Discriminator
from vaegan_dist.model.dropout import Dropout

KERNEL = 5
ENCODER_UNITS, DISCRIMINATOR_UNITS = 1024, 512


def channels(count: int, width: float) -> int:
    return max(1, round(count * width))


def down(fan_in: int, fan_out: int, batch_norm: bool = True) -> list[nn.Module]:
    """5×5 conv, stride 2 ('same' padding: the side halves, rounded up) → BN → ReLU (without BN, the conv has a
    bias)."""
    conv = nn.Conv2d(fan_in, fan_out, KERNEL, stride=2, padding=KERNEL // 2, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(fan_out), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]


def up(fan_in: int, fan_out: int) -> list[nn.Module]:
    """5×5 transposed conv, stride 2 (the side doubles) → BN → ReLU."""
    return [nn.ConvTranspose2d(fan_in, fan_out, KERNEL, stride=2, padding=KERNEL // 2, output_padding=1, bias=False),
            nn.BatchNorm2d(fan_out), nn.ReLU()]


def dense(fan_in: int, fan_out: int, batch_norm: bool = True) -> list[nn.Module]:
    linear = nn.Linear(fan_in, fan_out, bias=not batch_norm)
    return [linear, nn.BatchNorm1d(fan_out), nn.ReLU()] if batch_norm else [linear, nn.ReLU()]


class ConvShape:
    """The sizes of the networks for images (C, s, s) at a width: the decoded side, the maps' side, the channels."""

    def __init__(self, image_shape: tuple[int, int, int], width: float) -> None:
        self.image_shape = image_shape
        self.image_channels, side, _ = image_shape
        self.decoded_side = 8 * math.ceil(side / 8)
        self.map_side = self.decoded_side // 8
        middle = 192 if self.decoded_side <= 32 else 256
        self.encoder = [channels(c, width) for c in (64, 128, 256)]
        self.decoder = [channels(c, width) for c in (256, middle, 128, 32)]  # the first: the FC layer's maps
        self.discriminator = [channels(c, width) for c in (32, 128, middle, 256)]
        self.encoder_units = channels(ENCODER_UNITS, width)
        self.discriminator_units = channels(DISCRIMINATOR_UNITS, width)

    def flat(self, maps: int) -> int:
        return maps * self.map_side * self.map_side


class ConvEncoder(nn.Module):
    """batch_norm False: the same layers without batch norm, whose batch statistics would make every batch's codes
    alike in mean and spread, whatever its images (docs/architecture.md, "Batch norm")."""

    def __init__(self, shape: ConvShape, latent_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        c, bn = [shape.image_channels, *shape.encoder], batch_norm
        self.body = nn.Sequential(nn.Unflatten(1, shape.image_shape), *down(c[0], c[1], bn), *down(c[1], c[2], bn),
                                  *down(c[2], c[3], bn), nn.Flatten(),
                                  *dense(shape.flat(c[3]), shape.encoder_units, bn))
        self.mu = nn.Linear(shape.encoder_units, latent_dim)
        self.logvar = nn.Linear(shape.encoder_units, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z | x) for images x of shape (B, C·H·W)."""
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    def __init__(self, shape: ConvShape, latent_dim: int) -> None:
        super().__init__()
        c = shape.decoder
        crop = (shape.decoded_side - shape.image_shape[1]) // 2
        self.body = nn.Sequential(*dense(latent_dim, shape.flat(c[0])),
                                  nn.Unflatten(1, (c[0], shape.map_side, shape.map_side)),
                                  *up(c[0], c[1]), *up(c[1], c[2]), *up(c[2], c[3]))
        self.out = nn.Sequential(nn.Conv2d(c[3], shape.image_channels, KERNEL, padding=KERNEL // 2),
                                 nn.ZeroPad2d(-crop), nn.Tanh(), nn.Flatten())

    def forward(self, z: Tensor) -> Tensor:
        """Images of shape (B, C·H·W) in [-1, 1]."""
        return self.out(self.body(z))


def conv_discriminator(shape: ConvShape, similarity: str, dropout: float = 0.0,
                       spectral_norm: bool = False) -> Discriminator:
    """Dis_l 'hidden' is the third strided block's maps, flattened (the authors' recon_depth 9). Dropout before
    every layer, as in the fully connected discriminator (the paper's has none: dropout 0)."""
    c = [shape.image_channels, *shape.discriminator]
    body = nn.Sequential(nn.Unflatten(1, shape.image_shape), Dropout(dropout),
                         nn.Conv2d(c[0], c[1], KERNEL, padding=KERNEL // 2), nn.ReLU(),
                         Dropout(dropout), *down(c[1], c[2]), Dropout(dropout), *down(c[2], c[3]),
                         Dropout(dropout), *down(c[3], c[4]), nn.Flatten())
    out = nn.Sequential(Dropout(dropout), *dense(shape.flat(c[4]), shape.discriminator_units), Dropout(dropout),
                        nn.Linear(shape.discriminator_units, 1))
    return Discriminator(body, out, similarity, spectral_norm)
