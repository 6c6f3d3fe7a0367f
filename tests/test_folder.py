"""--dataset folder: a folder of PNG and JPEG images at any depth, decoded once into a cached array at the training
size; bad folders and files are one line naming them; the convolutional networks train on it in colour."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw

from tests.conftest import launch, tiny_config, tiny_flags
from vaegan_dist import VAEGAN
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.metrics_log import read_records
from vaegan_dist.checkpoint.reading import Checkpoint, verify
from vaegan_dist.cli.eval import main as eval_main
from vaegan_dist.cli.sample import main as sample_main
from vaegan_dist.config import TrainConfig
from vaegan_dist.data import folder as folder_module
from vaegan_dist.data.folder import TEST_EVERY, load_folder, split_files
from vaegan_dist.data.mnist import DataError
from vaegan_dist.training.loop import train

COUNT = 60  # 57 to train, 3 held out


def shape_image(index: int, size: tuple[int, int]) -> Image.Image:
    """A coloured shape on a coloured background, different for every index."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    box = sorted(rng.integers(0, min(size), 2)), sorted(rng.integers(0, min(size), 2))
    draw = ImageDraw.Draw(image)
    shape = draw.ellipse if index % 2 else draw.rectangle
    shape([box[0][0], box[1][0], box[0][1] + 2, box[1][1] + 2], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """COUNT images in nested folders: PNGs and JPEGs, landscape and portrait, of several sizes."""
    root = tmp_path_factory.mktemp("shapes")
    for index in range(COUNT):
        folder = root / f"part{index % 3}" / ("deeper" if index % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (40 + index % 7, 30 + index % 11) if index % 2 else (30, 44)
        shape_image(index, size).save(folder / f"{index:03d}.{'jpg' if index % 4 == 0 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEGAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_folder_is_cropped_resized_split_and_decoded_once(images, cache_dir, monkeypatch):
    train_images, test_images = load_folder(images, (3, 16, 16), "train", "test")
    assert train_images.shape == (COUNT - COUNT // TEST_EVERY, 3, 16, 16) and train_images.dtype == torch.uint8
    assert test_images.shape == (COUNT // TEST_EVERY, 3, 16, 16)
    files = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))
    with Image.open(files[0]) as first:  # 43 × 33, landscape: the centre 33 × 33, resized
        assert first.size == (43, 33)
        expected = np.asarray(first.convert("RGB").resize((16, 16), Image.Resampling.LANCZOS, box=(5, 0, 38, 33)))
    assert np.array_equal(train_images[0].permute(1, 2, 0).numpy(), expected)
    assert len(list(cache_dir.glob("*.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_module, "decode_all", no_decoding)
    assert torch.equal(load_folder(images, (3, 16, 16), "train")[0], train_images)  # from the cache
    grey = folder_module.decode(files[0], (1, 16, 16))
    assert isinstance(grey, np.ndarray) and grey.shape == (1, 16, 16)


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: None, "holds 0 PNG or JPEG images: a run needs at least 20"),
    (lambda root: (root / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"), "cannot read image .*x.png"),
])
def test_an_empty_folder_or_a_corrupt_image_is_one_line_naming_it(tmp_path, make, message, images):
    root = tmp_path / "data"
    if "cannot read" in message:
        shutil.copytree(images, root)
    else:
        root.mkdir()
    make(root)
    with pytest.raises(DataError, match=message):
        load_folder(root, (3, 16, 16), "train")
    with pytest.raises(DataError, match="is not a directory"):
        load_folder(tmp_path / "absent", (3, 16, 16), "train")


FOLDER = dict(architecture="conv", conv_width=0.0625, latent_dim=4, dataset="folder", image_size=16, batch_size=8,
              eval_samples=0, ema_decay=0.9)


def test_conv_networks_train_on_a_folder_in_colour_and_export(images, tmp_path, capsys):
    config = tiny_config(**{**FOLDER, "eval_samples": 10}, data_dir=str(images), max_steps=3,
                         output_dir=str(tmp_path / "run"))
    assert train(config, Accelerator(cpu=True)) == 0
    (evaluation,) = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if "eval/recon_psnr" in r]
    assert evaluation["step"] == 3 and evaluation["eval/recon_mse"] > 0
    with Image.open(tmp_path / "run" / "samples" / "step_0000003.png") as grid:
        assert grid.mode == "RGB" and grid.size == (8 * 18 + 2, 8 * 18 + 2)
    model = VAEGAN.from_pretrained(tmp_path / "run")
    assert model.config.image_shape == (3, 16, 16)
    assert model.sample(2).shape == (2, 3, 16, 16)
    sample_main([str(tmp_path / "run"), "--mode", "reconstruct", "--count", "3", "--out", str(tmp_path / "r.npy")])
    assert np.load(tmp_path / "r.npy").shape == (3, 2, 16, 16, 3)
    labels = tmp_path / "list_attr.txt"
    files, marked = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg")), split_files(images, "test")[0]
    lines = [f"{f.name} {1 if f == marked else -1} -1\n" for f in files]  # one test image is round
    labels.write_text(f"{len(files)}\nRound Big\n" + "".join(lines) + "\n")  # a blank last line is fine
    sample_main([str(tmp_path / "run"), "--mode", "attribute", "--attribute", "Round", "--labels", str(labels),
                 "--count", "1", "--out", str(tmp_path / "round.npy")])
    assert np.load(tmp_path / "round.npy").shape == (1, 3, 16, 16, 3)
    with pytest.raises(SystemExit):
        sample_main([str(tmp_path / "run"), "--mode", "attribute", "--attribute", "Rund", "--labels", str(labels),
                     "--out", str(tmp_path / "x.png")])
    assert "did you mean Round?" in capsys.readouterr().err
    eval_main([str(tmp_path / "run"), "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == COUNT // TEST_EVERY
    assert report["model"]["recon_mse"] == pytest.approx(evaluation["eval/recon_mse"], rel=1e-4)


def test_keep_best_links_the_best_evaluations_checkpoint_and_keeps_it_from_pruning(images, tmp_path):
    """Evaluations every 16 images (2 steps of 8), one checkpoint kept: checkpoints/best still holds the one with
    the lowest eval/recon_mse, it loads, and a resume compares against it."""
    run = tmp_path / "run"
    config = tiny_config(**{**FOLDER, "eval_samples": 10}, data_dir=str(images), max_steps=8, eval_every_images=16,
                         save_every=100, keep_last=1, keep_best=True, output_dir=str(run), lr=3e-3)
    assert train(config, Accelerator(cpu=True)) == 0
    evaluations = [r for r in read_records(run / "metrics.jsonl") if "eval/recon_mse" in r]
    assert [r["step"] for r in evaluations] == [2, 4, 6, 8]
    best = min(evaluations, key=lambda r: r["eval/recon_mse"])
    link = checkpoints_dir(run) / "best"
    assert link.is_symlink() and link.resolve().name == f"step_{best['step']:07d}" and verify(link.resolve()) is None
    assert Checkpoint(checkpoints_dir(run) / "step_0000008").state["best"] == {
        "step": best["step"], "value": pytest.approx(best["eval/recon_mse"])}
    assert VAEGAN.from_pretrained(link).config.image_shape == (3, 16, 16)
    assert train(dataclasses.replace(config, max_steps=10), Accelerator(cpu=True)) == 0  # resumes at step 8
    evaluations = [r for r in read_records(run / "metrics.jsonl") if "eval/recon_mse" in r]
    best = min(evaluations, key=lambda r: r["eval/recon_mse"])
    assert link.resolve().name == f"step_{best['step']:07d}" and link.resolve().is_dir()


def test_two_processes_decode_the_folder_once_and_save_replicas_that_agree(images, tmp_path, cache_dir):
    """Each process updates batch norm's running statistics from its own half of the batch: the saves take the
    main process's on every process, so the replicas' digests agree, mid-run and at the end."""
    result = launch(tiny_flags(**FOLDER, data_dir=images, max_steps=3, save_every=2, output_dir=tmp_path / "run"),
                    num_processes=2, env={"VAEGAN_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-4000:]
    saved = [Checkpoint(p) for p in sorted(checkpoints_dir(tmp_path / "run").glob("step_*"))]
    assert [c.state["position"]["step"] for c in saved] == [2, 3] and saved[0].config["dataset"] == "folder"
    assert all(verify(c.path) is None and len(set(c.state["replica_digests"])) == 1 for c in saved)
    assert len(list(cache_dir.glob("*.npy"))) == 1


def test_a_corrupt_image_stops_every_process_with_one_line(images, tmp_path, cache_dir):
    broken = shutil.copytree(images, tmp_path / "broken")
    (broken / "part0" / "zz.png").write_bytes(b"not a png")
    result = launch(tiny_flags(**FOLDER, data_dir=broken, max_steps=1, output_dir=tmp_path / "run"),
                    num_processes=2, env={"VAEGAN_CACHE": str(cache_dir)}, timeout=120)
    assert result.returncode != 0 and result.stderr.count("error: cannot read image") == 1, result.stderr[-3000:]
    assert str(broken / "part0" / "zz.png") in result.stderr


def test_the_celeba64_preset_trains_on_64_pixel_colour_images(images, tmp_path):
    """The paper's networks at full width, for two steps of four images."""
    config = TrainConfig.preset("celeba64", data_dir=str(images), batch_size=4, max_steps=2, cpu_threads=1,
                                output_dir=str(tmp_path / "run"))
    assert config.image_shape == (3, 64, 64) and config.conv_width == 1.0 and config.gan_margin == 0.35
    assert train(config, Accelerator(cpu=True)) == 0
    assert verify(checkpoints_dir(tmp_path / "run") / "step_0000002") is None
