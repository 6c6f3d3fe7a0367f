"""What every discriminator shares: a body from images to Dis_l's features, then a head from them to the logit."""

from __future__ import annotations

from torch import Tensor, nn


class Discriminator(nn.Module):
    """body: images (B, C·H·W) → features; out: features → the logit (B, 1). similarity: Dis_l is the logit
    ('logit', the design) or the body's features ('hidden', the paper)."""

    def __init__(self, body: nn.Module, out: nn.Module, similarity: str, spectral_norm: bool = False) -> None:
        super().__init__()
        self.body = body
        self.out = out
        self.similarity_kind = similarity
        if spectral_norm:
            # Each weight divided by its largest singular value (one power iteration per training forward):
            # D is 1-Lipschitz, so neither its logit nor Dis_l, the similarity's features, can grow without bound.
            for layer in [m for m in self.modules() if isinstance(m, nn.Linear | nn.Conv2d)]:
                nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: Tensor, with_similarity: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The logit of "x is real", shape (B, 1); with_similarity also returns Dis_l(x) from the same pass."""
        features = self.body(x)
        logit = self.out(features)
        if not with_similarity:
            return logit
        return logit, (logit if self.similarity_kind == "logit" else features)

    def similarity(self, x: Tensor) -> Tensor:
        """Dis_l(x), the learned similarity."""
        return self.forward(x, with_similarity=True)[1]
