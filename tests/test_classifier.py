"""The shipped evaluation classifier: its accuracy, its size, and the determinism of its training."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from vaegan_dist.data.mnist import load_mnist
from vaegan_dist.evaluation.classifier import WEIGHTS, accuracy, load_classifier, train_classifier
from vaegan_dist.model.networks import images_to_pixels


def test_shipped_weights_reach_98_5_percent_on_the_test_set():
    images, labels = load_mnist(None, "test")
    assert accuracy(load_classifier(), images_to_pixels(images), labels) >= 0.985


def test_shipped_weights_are_small_float16_safetensors():
    assert WEIGHTS.stat().st_size < 400_000
    assert {t.dtype for t in load_file(WEIGHTS).values()} == {torch.float16}


def test_training_is_deterministic_and_leaves_torch_settings_alone():
    images, labels = load_mnist(None, "train")
    threads = torch.get_num_threads()
    first, second = (train_classifier(images[:256], labels[:256], epochs=1, batch_size=64) for _ in range(2))
    other_seed = train_classifier(images[:256], labels[:256], epochs=1, batch_size=64, seed=1)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other_seed.head.weight)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
