"""A small MNIST classifier whose penultimate features and softmax measure the quality of generated digits.

Inception features suit MNIST poorly and their weights would have to be downloaded, so the package ships
its own network, trained deterministically from the bundled MNIST (fixed seeds, deterministic algorithms):

    python -m vaegan_dist.evaluation.classifier --out vaegan_dist/evaluation/classifier.safetensors

trains it for 5 epochs with Adam on one CPU thread (2.1 minutes on a shared 2-core machine; the same bytes
on every run) and writes float16 weights (193 KB) with 99.03% accuracy on the 10k test images. The features
are the 128 ReLU units before the last layer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vaegan_dist.data.mnist import DataError, load_mnist
from vaegan_dist.model.networks import images_to_pixels

WEIGHTS = Path(__file__).parent / "classifier.safetensors"
FEATURE_DIM = 128
NUM_CLASSES = 10


class Classifier(nn.Module):
    """Three 3×3 conv/ReLU/max-pool stages (28→14→7→3), a 128-unit ReLU layer (the features), 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 3 * 3, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10) of images x (B, 784) in [-1, 1], the decoder's format."""
        return self.head(self.features(x))


def embed(classifier: Classifier, pixels: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(features (N, 128), class probabilities (N, 10)) of pixel rows (N, 784) in [-1, 1], in float32."""
    features, probs = [], []
    with torch.no_grad():
        for chunk in pixels.split(batch_size):
            h = classifier.features(chunk.float())
            features.append(h)
            probs.append(F.softmax(classifier.head(h), dim=1))
    if not features:
        empty = pixels.new_zeros(0, FEATURE_DIM, dtype=torch.float32)
        return empty, pixels.new_zeros(0, NUM_CLASSES, dtype=torch.float32)
    return torch.cat(features), torch.cat(probs)


def load_classifier(device: torch.device | str = "cpu", path: Path = WEIGHTS) -> Classifier:
    """The shipped classifier, in float32 and eval mode, with its parameters frozen."""
    if not path.is_file():
        raise DataError(f"the classifier weights {path} are missing: restore them from the repository "
                                "(git checkout -- vaegan_dist/evaluation/classifier.safetensors) or retrain them with "
                                "python -m vaegan_dist.evaluation.classifier")
    with torch.device("meta"):  # no random initialisation: loading draws nothing from the global RNG
        classifier = Classifier()
    weights = {name: t.to(device, torch.float32) for name, t in load_file(path).items()}
    classifier.load_state_dict(weights, assign=True)
    return classifier.eval().requires_grad_(False)


@contextmanager
def deterministic() -> Iterator[None]:
    """One CPU thread and deterministic algorithms inside (CPU results depend on the thread count)."""
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0) -> Classifier:
    """A Classifier trained with Adam on the CPU on uint8 images (N, 28, 28): the same arguments give the same
    weights. Runs on one thread: on 2 shared cores that is also faster than two."""
    with deterministic():
        torch.manual_seed(seed)
        classifier = Classifier()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed)
        pixels, targets = images_to_pixels(images), labels.long()
        for _ in range(epochs):
            for index in torch.randperm(len(pixels), generator=order).split(batch_size):
                loss = F.cross_entropy(classifier(pixels[index]), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return classifier.eval()


def accuracy(classifier: Classifier, pixels: Tensor, labels: Tensor) -> float:
    """The fraction of pixel rows (N, 784) whose most probable class is the label."""
    _, probs = embed(classifier, pixels)
    return (probs.argmax(dim=1).cpu() == labels.long().cpu()).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaegan_dist.evaluation.classifier",
                                     description="Train the evaluation classifier on the bundled MNIST.")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the float16 safetensors")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    classifier = train_classifier(*load_mnist(None, "train"), epochs=args.epochs, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    weights = {name: t.detach().half().contiguous() for name, t in classifier.state_dict().items()}
    save_file(weights, args.out)
    test_images, test_labels = load_mnist(None, "test")
    shipped = load_classifier(path=args.out)
    test_accuracy = accuracy(shipped, images_to_pixels(test_images), test_labels)
    size_kb = args.out.stat().st_size / 1024
    print(f"{args.out}: {size_kb:.0f} KB, {test_accuracy:.2%} test accuracy as float16, "
          f"trained in {minutes:.1f} min ({args.epochs} epochs, seed {args.seed})")


if __name__ == "__main__":
    main()
