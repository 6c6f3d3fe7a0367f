"""torchvision's data sets as users keep them on disk (Fashion-MNIST's IDX files, CIFAR-10's batches in either
format), read without downloading and without unpickling anything but arrays; a short conv run on CIFAR-10."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from tests.conftest import tiny_config
from tests.test_inception import StandIn
from vaegan_dist import VAEGAN
from vaegan_dist.checkpoint.metrics_log import read_records
from vaegan_dist.cli.eval import main as eval_main
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.data.cifar import BATCHES
from vaegan_dist.data.images import load_images, load_labelled
from vaegan_dist.data.labels import has_attribute
from vaegan_dist.data.mnist import DataError
from vaegan_dist.evaluation.inception import inception_fid
from vaegan_dist.training.loop import train


def idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_fashion(root, count=(40, 10)):
    """The four IDX files, gzipped, in torchvision's layout (FashionMNIST/raw)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in zip(("train", "t10k"), count, strict=True):
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(rng.integers(0, 256, (n, 28, 28)))))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.arange(n) % 10)))
    return root


def cifar_batch(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8), [i % 10 for i in range(n)]


def fake_cifar(root, binary: bool, per_batch: int = 8):
    """CIFAR-10's six batches: torchvision's pickles (cifar-10-batches-py) or the binary version."""
    folder = root / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    for seed, name in enumerate(BATCHES["train"] + BATCHES["test"]):
        data, labels = cifar_batch(per_batch, seed)
        if binary:
            (folder / f"{name}.bin").write_bytes(np.concatenate([np.array(labels, np.uint8)[:, None], data], 1)
                                                 .tobytes())
        else:
            (folder / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": labels,
                                                      "filenames": [f"{i}.png" for i in range(per_batch)]},
                                                     protocol=2))
    return root


def test_fashion_mnist_is_read_from_torchvisions_layout(tmp_path):
    root = fake_fashion(tmp_path)
    config = TrainConfig(dataset="fashion_mnist", data_dir=str(root))
    train_images, test_images = load_images(config, "train", "test")
    assert train_images.shape == (40, 1, 28, 28) and test_images.shape == (10, 1, 28, 28)
    assert config.image_shape == (1, 28, 28)
    assert has_attribute(config, "3").tolist() == [i % 10 == 3 for i in range(10)]
    with pytest.raises(DataError, match=r"Fashion-MNIST file train-images-idx3-ubyte .* is not in .*download it once"):
        load_images(TrainConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "elsewhere")), "train")


@pytest.mark.parametrize("binary", [False, True])
def test_cifar10_is_read_in_either_format(tmp_path, binary):
    root = fake_cifar(tmp_path, binary)
    images, labels = load_labelled("cifar10", str(root), "train")
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist()[:3] == [0, 1, 2]
    data, _ = cifar_batch(8, 0)
    assert torch.equal(images[:8], torch.from_numpy(data.reshape(8, 3, 32, 32)))  # channels first, as stored
    assert TrainConfig(dataset="cifar10", data_dir=str(root)).image_shape == (3, 32, 32)


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    root = fake_cifar(tmp_path, binary=False)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(
        type("Planted", (), {"__reduce__": lambda self: (os.system, ("touch planted",))})()))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR batch .*posix.system is not part of a CIFAR"):
        load_labelled("cifar10", str(root), "test")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"CIFAR-10's test batches \(test_batch\) are not in"):
        load_labelled("cifar10", str(root), "test")


def test_the_data_sets_shapes_are_checked_and_need_their_files():
    with pytest.raises(ConfigError, match=r"'image_size' must be 32 \(or none\) for cifar10"):
        TrainConfig(dataset="cifar10", data_dir="d", image_size=64)
    with pytest.raises(DataError, match="--dataset fashion_mnist needs its images: give --data-dir DIR"):
        load_images(TrainConfig(dataset="fashion_mnist"), "train")


def test_conv_trains_on_cifar10_and_its_export_evaluates_with_the_data_given(tmp_path, capsys, monkeypatch):
    """With a stand-in for Inception: the training's evaluations and vaegan-eval's report an FID."""
    monkeypatch.setattr("vaegan_dist.evaluation.reconstruction.inception_fid", lambda: inception_fid(StandIn()))
    root = fake_cifar(tmp_path / "data", binary=True, per_batch=16)
    config = tiny_config(architecture="conv", conv_width=0.0625, dataset="cifar10", data_dir=str(root),
                         batch_size=8, max_steps=3, eval_samples=10, output_dir=str(tmp_path / "run"))
    assert train(config, Accelerator(cpu=True)) == 0
    (evaluation,) = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if "eval/fid" in r]
    assert evaluation["eval/fid"] > 0 and evaluation["eval/recon_mse"] > 0
    model = VAEGAN.from_pretrained(tmp_path / "run")
    model.save_pretrained(tmp_path / "export")
    assert model.sample(2).shape == (2, 3, 32, 32)
    with pytest.raises(SystemExit):  # the export keeps no paths: the data must be named
        eval_main([str(tmp_path / "export"), "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert "give --data-dir DIR" in capsys.readouterr().err
    eval_main([str(tmp_path / "export"), "--data-dir", str(root), "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["num_images"] == 16 and report["model"]["fid"] > 0  # the test batch; 10k samples


def test_mnists_files_where_fashion_mnist_is_asked_for_are_refused(tmp_path):
    import shutil

    from vaegan_dist.data.mnist import BUNDLED_DIR

    shutil.copytree(BUNDLED_DIR, tmp_path / "mixed", ignore=shutil.ignore_patterns("LICENSE*"))
    config = TrainConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is MNIST's, not Fashion-MNIST's"):
        load_images(config, "train")
    fake_fashion(tmp_path / "mixed")  # torchvision's layout beside them: found first
    assert load_images(config, "train")[0].shape[0] == 40
