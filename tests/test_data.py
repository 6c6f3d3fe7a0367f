"""MNIST loading (checksums, headers, clear errors) and the sharding of each epoch over processes."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from vaegan_dist.data import mnist as data
from vaegan_dist.data.mnist import BUNDLED_DIR, DataError, load_mnist
from vaegan_dist.data.sharding import ShardedBatches, epoch_permutation


def test_bundled_mnist_loads_with_published_checksums():
    images, labels = load_mnist(None, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.unique().tolist()) == set(range(10))
    test_images, test_labels = load_mnist(None, "test")
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)


@pytest.fixture
def labels_dir(tmp_path):
    """A data dir holding the small label files, uncompressed, as a user might keep them."""
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((BUNDLED_DIR / f"{name}.gz").read_bytes()))
    return tmp_path


def read_labels(folder):
    name = "t10k-labels-idx1-ubyte"
    return data.read_idx(data.locate(folder, name), data.MNIST_MD5[name])


def test_uncompressed_files_and_torchvision_layout_are_found(labels_dir, tmp_path_factory):
    assert read_labels(labels_dir).shape == (10000,)
    torchvision_root = tmp_path_factory.mktemp("tv")
    (torchvision_root / "MNIST" / "raw").mkdir(parents=True)
    shutil.copy(BUNDLED_DIR / "t10k-labels-idx1-ubyte.gz", torchvision_root / "MNIST" / "raw")
    assert torch.equal(read_labels(torchvision_root), read_labels(labels_dir))


def test_wrong_md5_names_the_file(labels_dir):
    path = labels_dir / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is corrupt: .*MD5.*fresh copy"):
        read_labels(labels_dir)


def test_truncated_file_names_the_file(labels_dir):
    path = labels_dir / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: its IDX header promises shape \[10000\]"):
        read_labels(labels_dir)


def test_truncated_gzip_names_the_file(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / name).write_bytes((BUNDLED_DIR / name).read_bytes()[:2000])
    with pytest.raises(DataError, match=r"cannot read MNIST file .*t10k-labels-idx1-ubyte.gz .*truncated"):
        read_labels(tmp_path)


def test_wrong_header_names_the_file(labels_dir):
    path = labels_dir / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])  # type code 0x0D is float
    with pytest.raises(DataError, match="has no unsigned-byte IDX header"):
        read_labels(labels_dir)


def test_missing_files_try_torchvision_download_then_explain(tmp_path, monkeypatch):
    attempts = []

    def offline(folder):
        attempts.append(folder)
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte not found in .*network unreachable.*"
                                        r"leave out --data-dir"):
        load_mnist(tmp_path, "train")
    assert attempts == [tmp_path]


def test_download_fills_a_missing_data_dir(tmp_path, monkeypatch):
    def fake_torchvision_download(folder):
        raw = folder / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in data.MNIST_MD5:
            shutil.copy(BUNDLED_DIR / f"{name}.gz", raw)

    monkeypatch.setattr(data, "_download", fake_torchvision_download)
    images, _ = load_mnist(tmp_path / "fresh", "test")
    assert images.shape == (10000, 28, 28)


def all_indices(num_images, batch, processes, epoch, images_seen=0, seed=7):
    images = torch.arange(num_images, dtype=torch.int64).reshape(num_images, 1)
    per_process = [list(ShardedBatches(images, batch, processes, rank, seed).indices(epoch, images_seen))
                   for rank in range(processes)]
    return per_process


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_each_epoch_is_a_disjoint_cover_of_whole_batches(processes):
    num_images, batch = 1003, 10
    per_process = all_indices(num_images, batch, processes, epoch=0)
    steps = num_images // (batch * processes)
    assert all(len(batches) == steps for batches in per_process)  # every process takes as many steps
    used = torch.cat([index for batches in per_process for index in batches])
    assert used.numel() == steps * batch * processes
    assert used.unique().numel() == used.numel()  # no image twice in one epoch, over all processes
    assert num_images - used.numel() < batch * processes  # only a remainder short of a global batch is dropped
    for rank in range(processes):
        for a in range(processes):
            if a != rank:
                assert not set(torch.cat(per_process[rank]).tolist()) & set(torch.cat(per_process[a]).tolist())


def test_epochs_are_fresh_permutations_and_the_same_on_every_process():
    first = torch.cat(all_indices(100, 10, 1, epoch=0)[0])
    second = torch.cat(all_indices(100, 10, 1, epoch=1)[0])
    assert not torch.equal(first, second)
    assert torch.equal(first, torch.cat(all_indices(100, 10, 1, epoch=0)[0]))
    assert torch.equal(epoch_permutation(100, 7, 3), epoch_permutation(100, 7, 3))


def test_global_step_composition_does_not_depend_on_process_count():
    """Global step s always uses images [s·G, (s+1)·G) of the epoch's order, however they are split."""
    one = all_indices(120, 20, 1, epoch=2)[0]
    two = all_indices(120, 10, 2, epoch=2)
    for step, batch in enumerate(one):
        assert torch.equal(batch, torch.cat([two[0][step], two[1][step]]))


def test_resuming_mid_epoch_on_another_process_count_skips_and_repeats_nothing():
    seen = torch.cat([torch.cat(b[:2]) for b in all_indices(120, 10, 2, epoch=0)])  # 2 steps on 2 processes
    rest = torch.cat([torch.cat(b) for b in all_indices(120, 10, 3, epoch=0, images_seen=40)])
    assert not set(seen.tolist()) & set(rest.tolist())
    used = torch.cat([seen, rest])
    assert used.unique().numel() == used.numel() == 100  # 80 left over 3 processes × 10: 20 are a remainder


def test_batches_are_uint8_rows_cut_on_the_device():
    images = torch.randint(0, 255, (50, 28, 28), dtype=torch.uint8)
    shards = ShardedBatches(images, 8, 2, 1, seed=0)
    batch = next(shards.batches(0))
    assert batch.shape == (8, 784) and batch.dtype == torch.uint8
    index = next(shards.indices(0))
    assert torch.equal(batch, images.reshape(50, 784)[index])
