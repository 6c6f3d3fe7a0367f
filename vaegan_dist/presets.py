"""The named presets: settings (TrainConfig's field names) that `--preset NAME` starts from, below a config
file and the flags. Each comment says what the preset is for; docs/settings.md says why."""

from __future__ import annotations

from typing import Any

# The design's encoder loss: the KL divided by B·784, no pixel term, rec as it is, no prior match.
DESIGN_TERMS: dict[str, Any] = dict(kl_weight=1.0, pixel_weight=0.0, normalise_similarity=False, prior_match_weight=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # The project's design, exactly: logit similarity, minimax decoder loss, dropout 0.1 everywhere.
    "seed": dict(gamma=25.0, beta=5.0, similarity="logit", generator_loss="minimax", dropout=0.1,
                 encoder_dropout=None, decoder_dropout=None, discriminator_dropout=None,
                 lr=1e-4, adam_beta1=0.9, adam_beta2=0.999, ema_decay=0.0, batch_size=128, **DESIGN_TERMS),
    # The design with the paper's learned similarity: a hidden layer of the discriminator.
    "paper": dict(gamma=25.0, beta=5.0, similarity="hidden", generator_loss="minimax", dropout=0.1,
                  encoder_dropout=None, decoder_dropout=None, discriminator_dropout=None,
                  lr=1e-4, adam_beta1=0.9, adam_beta2=0.999, ema_decay=0.0, batch_size=128, **DESIGN_TERMS),
    # Trains legible digits once gradients are routed correctly: hidden-layer similarity, non-saturating
    # decoder loss, γ = 1, Adam(2e-4, β1 = 0.5), batch 128, no dropout in the encoder and decoder (docs/settings.md).
    "starting_point": dict(lr=2e-4, ema_decay=0.0, batch_size=128, **DESIGN_TERMS),
    # The starting point with lr 3e-4 and batch 64, sampled from the moving averages: good samples
    # (classifier-FID 4.69), but an encoder that does not autoencode (docs/results.md).
    "samples_first": dict(DESIGN_TERMS),
    # samples_first with the autoencoder's terms: the KL weighed 10× the design's, a pixel term
    # 10·mean((x̃ − x)²) beside the learned similarity, rec normalised by mean(Dis_l(x)²), and the batch's codes
    # held to N(0, I)'s mean and variance (10·mismatch): as good samples, and faithful reconstructions.
    "default": {},
    # The paper's convolutional networks on MNIST at half width, 2 h 15 min on a 2-core CPU (bf16): the
    # default's losses with the KL weighed 40× the design's, 20 latent dimensions, the paper's equilibrium margin
    # and a learning rate that falls to 0 over the second half; the encoder without batch norm, dropout 0.1 in the
    # discriminator. Sample it with --prior mixture: its codes leave parts of N(0, I) empty (docs/results.md).
    "mnist_conv": dict(architecture="conv", conv_width=0.5, latent_dim=20, kl_weight=40.0, gan_margin=0.35,
                       lr_schedule="linear", max_steps=26_000),
    # The paper's CelebA recipe on the default's losses: its convolutional networks at full width (batch norm in
    # the encoder, no dropout), 64×64 colour crops of a folder (--data-dir img_align_celeba), 128 latent
    # dimensions, batch 64 and its equilibrium margin.
    "celeba64": dict(architecture="conv", conv_width=1.0, encoder_batch_norm=True, discriminator_dropout=0.0,
                     dataset="folder", image_size=64, channels=3, latent_dim=128, batch_size=64, gan_margin=0.35),
}
DEFAULT_PRESET = "default"
