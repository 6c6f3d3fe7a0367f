"""The design's VAE/GAN step as a user would write it: the plain baseline that benchmarks/bench.py runs.

torchvision's MNIST with ToTensor and a DataLoader (batch 128, shuffled), five discriminator calls per step
(x, and the detached x̃ and x_p for the discriminator's loss; x̃ and x_p again for the decoder's and the
encoder's), each network's gradient from its own loss alone by torch.autograd.grad (as tests/test_step.py's
reference does), and three default Adams. The networks are the package's, so both loops multiply the same
matrices, with torch's nn.Dropout in place of the package's cheaper CPU dropout, as a user's networks have; and
none of the package's CPU process settings (vaegan_dist/training/cpu.py). Prints one JSON object: the images/s of each
timed window.

    python benchmarks/baseline.py --steps 60 --window 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.datasets.utils import extract_archive

from vaegan_dist.config import TrainConfig
from vaegan_dist.data.mnist import BUNDLED_DIR
from vaegan_dist.model.dropout import Dropout
from vaegan_dist.model.networks import build_models


def bundled_mnist(root: Path) -> datasets.MNIST:
    """torchvision's MNIST over the IDX files bundled with vaegan-dist, as if it had downloaded them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in BUNDLED_DIR.glob("*.gz"):
        extract_archive(str(archive), str(raw))
    return datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())


def with_torch_dropout(net: nn.Module) -> nn.Module:
    """net with each of the package's dropout layers replaced by torch's own, of the same p."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return net


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def plain_step(networks: tuple[nn.Module, nn.Module, nn.Module], optimizers: list[torch.optim.Optimizer],
               config: TrainConfig) -> Callable[[torch.Tensor], None]:
    """The step as a user writes it: five discriminator calls, each network's gradient from its own loss alone by
    torch.autograd.grad, then each Adam; x is a batch of pixel rows in [-1, 1]."""
    encoder, decoder, discriminator = networks

    def train_step(x: torch.Tensor) -> None:
        mu, logvar = encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        x_tilde, x_p = decoder(z), decoder(torch.randn_like(mu))
        logit_x, dis_l_x = discriminator(x, with_similarity=True)
        dis_loss = bce(logit_x, 1.0) + bce(discriminator(x_tilde.detach()), 0.0) + bce(discriminator(x_p.detach()), 0.0)
        logit_x_tilde, dis_l_x_tilde = discriminator(x_tilde, with_similarity=True)
        logit_x_p = discriminator(x_p)
        rec = (dis_l_x_tilde - dis_l_x).pow(2).mean()
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.numel()
        if config.generator_loss == "minimax":
            gen_loss = -(bce(logit_x_tilde, 0.0) + bce(logit_x_p, 0.0) + bce(logit_x, 1.0))
        else:
            gen_loss = bce(logit_x_tilde, 1.0) + bce(logit_x_p, 1.0)
        losses = (kld + config.beta * rec, config.gamma * rec + gen_loss, dis_loss)
        grads = [torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
                 for loss, net in zip(losses, networks, strict=True)]
        for net, optimizer, net_grads in zip(networks, optimizers, grads, strict=True):
            for p, g in zip(net.parameters(), net_grads, strict=True):
                p.grad = g
            optimizer.step()

    return train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps in all, the first window being warm-up")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--latent-dim", type=int, default=20)
    args = parser.parse_args()
    config = TrainConfig.preset(args.preset, hidden_dim=args.hidden_dim, depth=args.depth,
                                latent_dim=args.latent_dim)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    encoder, decoder, discriminator = (with_torch_dropout(net).to(device) for net in build_models(config))
    networks = (encoder, decoder, discriminator)
    optimizers = [torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
                  for net in networks]

    train_step = plain_step(networks, optimizers, config)

    with tempfile.TemporaryDirectory() as root:
        loader = DataLoader(bundled_mnist(Path(root)), batch_size=args.batch_size, shuffle=True, drop_last=True)
        windows, step, started = [], 0, time.perf_counter()
        while step < args.steps:
            for images, _ in loader:
                train_step(images.to(device).view(images.shape[0], -1) * 2 - 1)
                step += 1
                if step % args.window == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    windows.append(args.window * args.batch_size / (now - started))
                    started = now
                if step == args.steps:
                    break
    print(json.dumps({"images_per_s": windows}))


if __name__ == "__main__":
    main()
