"""vaegan_dist.VAEGAN: the Hugging Face format (save_pretrained / from_pretrained / push_to_hub), offline, from
every kind of directory the project writes, and the methods' shapes and ranges."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

import vaegan_dist
from tests.conftest import REPO, tiny_config
from vaegan_dist import VAEGAN
from vaegan_dist.checkpoint.writing import save_checkpoint
from vaegan_dist.cli.export import main as export_main
from vaegan_dist.hub.model import export_networks
from vaegan_dist.hub.network_files import PORTABLE_SETTINGS, load_networks, portable_settings
from vaegan_dist.model.networks import build_models, moving_averages
from vaegan_dist.training.metrics import MetricWindow
from vaegan_dist.training.state import Position, TrainState
from vaegan_dist.training.step import adam_optimizers


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hub: huggingface_hub refuses every request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def model(**overrides) -> VAEGAN:
    torch.manual_seed(3)
    return VAEGAN(tiny_config(**overrides)).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_save_pretrained_round_trips_bitwise_in_the_hub_format(tmp_path):
    original = model(latent_dim=3)
    original.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "_class_name": "VAEGAN", "_vaegan_dist_version": vaegan_dist.__version__,
        **{key: getattr(original.config, key) for key in PORTABLE_SETTINGS}}
    assert {k.split(".")[0] for k in load_file(tmp_path / "model.safetensors")} == {"encoder", "decoder"}
    loaded = VAEGAN.from_pretrained(tmp_path)
    assert portable_settings(loaded.config) == portable_settings(original.config) and not loaded.training
    assert same_weights(loaded, original)
    x = images()
    assert torch.equal(loaded.reconstruct(x), original.reconstruct(x))


def test_methods_take_and_give_images_in_zero_one(tmp_path):
    m = model()
    x = images(6)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (6, m.latent_dim)
    for out in (m.decode(mu), m.reconstruct(x), m.sample(6)):
        assert out.shape == (6, 1, 28, 28) and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
    # the networks see [-1, 1] rows: encode converts, decode converts back
    rows = x.reshape(6, 784) * 2 - 1
    torch.testing.assert_close(mu, m.encoder(rows)[0])
    torch.testing.assert_close(m.decode(mu), (m.decoder(mu).reshape(6, 1, 28, 28) + 1) / 2)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(m.sample(4, generator=g), m.sample(4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(m.sample(4, generator=torch.Generator().manual_seed(7)),
                       m.decode(torch.randn(4, m.latent_dim, generator=torch.Generator().manual_seed(7))))


def test_float16_weights_load_as_float32_and_save_as_float16_unless_cast(tmp_path):
    m = model()
    m.half().save_pretrained(tmp_path / "a")
    assert {t.dtype for t in load_file(tmp_path / "a" / "model.safetensors").values()} == {torch.float16}
    loaded = VAEGAN.from_pretrained(tmp_path / "a")
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}
    loaded.save_pretrained(tmp_path / "b")  # the loaded dtype, not float32 twice the size
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert same_weights(copy.deepcopy(loaded).half(), m)
    loaded.to(torch.bfloat16).save_pretrained(tmp_path / "c")  # a cast since: the new dtype
    assert {t.dtype for t in load_file(tmp_path / "c" / "model.safetensors").values()} == {torch.bfloat16}
    assert "the weights (bfloat16)" in (tmp_path / "c" / "README.md").read_text()


def checkpointed_run(run_dir: Path, config) -> Path:
    """A real checkpoint (save_checkpoint) with moving averages, in run_dir/checkpoints."""
    torch.manual_seed(0)
    networks = build_models(config)
    averages = moving_averages(config, networks)
    with torch.no_grad():
        for p in [*averages.encoder.parameters(), *averages.decoder.parameters()]:
            p.add_(1.0)  # unlike the trained networks, so which ones load shows
    state = TrainState(Position(8, 0, 128), MetricWindow(torch.device("cpu")))
    return save_checkpoint(Accelerator(cpu=True), run_dir, config, networks, adam_optimizers(networks, config),
                           state, averages)


def test_from_pretrained_reads_exports_old_and_new_checkpoints_and_run_directories(tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "run"), ema_decay=0.9)
    checkpoint = checkpointed_run(tmp_path / "run", config)
    _, encoder, ema_decoder = load_networks(checkpoint)
    _, raw_encoder, raw_decoder = load_networks(checkpoint, weights="raw")
    assert not same_weights(encoder, raw_encoder) and not same_weights(ema_decoder, raw_decoder)
    for source in (checkpoint, tmp_path / "run"):
        loaded = VAEGAN.from_pretrained(source)
        assert same_weights(loaded.encoder, encoder) and same_weights(loaded.decoder, ema_decoder)
    raw = VAEGAN.from_pretrained(checkpoint, weights="raw")
    assert same_weights(raw.encoder, raw_encoder) and same_weights(raw.decoder, raw_decoder)

    old_style = tmp_path / "old"  # an export as vaegan-export wrote them before: encoder/decoder.safetensors
    old_style.mkdir()
    for name in ("config.json", "encoder.safetensors", "decoder.safetensors"):
        shutil.copy(checkpoint / name, old_style / name)
    assert same_weights(VAEGAN.from_pretrained(old_style).encoder, raw_encoder)

    export_networks(encoder, ema_decoder, config, tmp_path / "new", dtype=torch.float32)
    new = VAEGAN.from_pretrained(tmp_path / "new")
    assert same_weights(new.encoder, encoder) and same_weights(new.decoder, ema_decoder)


def test_pretrained_as_it_ships_loads_offline_and_makes_digits():
    m = VAEGAN.from_pretrained(REPO / "pretrained")
    _, encoder, decoder = load_networks(REPO / "pretrained")
    assert same_weights(m.encoder, encoder) and same_weights(m.decoder, decoder)
    digits = m.sample(16, generator=torch.Generator().manual_seed(0))
    assert digits.shape == (16, 1, 28, 28) and digits.std() > 0.2


def card_metadata(directory: Path) -> dict:
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_vaegan_export_writes_the_hub_format_with_a_model_card(tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(output_dir=str(run), ema_decay=0.9, lr=5e-4)
    checkpoint = checkpointed_run(run, config)
    evaluation = {"step": 8, "epoch": 0, "eval/fid": 12.5, "eval/precision": 0.5, "eval/recall": 0.25}
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "enc_loss": 1.0}) + "\n" + json.dumps(evaluation)
                                       + "\n" + json.dumps({**evaluation, "step": 20, "eval/fid": 1.0}) + "\n")
    export_main([str(run), str(tmp_path / "out"), "--license", "mit"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    meta = card_metadata(out)
    assert meta["license"] == "mit" and meta["datasets"] == ["mnist"] and meta["library_name"] == "vaegan-dist"
    assert {"vae-gan", "mnist"} <= set(meta["tags"])
    results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results == {"fid": 12.5, "precision": 0.5, "recall": 0.25}  # the evaluation at the checkpoint's step
    card = (out / "README.md").read_text()
    assert "python train.py " in card and "--lr 0.0005" in card and "--ema-decay 0.9" in card
    _, encoder, decoder = load_networks(checkpoint)
    loaded = VAEGAN.from_pretrained(out)
    assert same_weights(loaded.encoder, encoder.half().float()) and same_weights(loaded.decoder,
                                                                                  decoder.half().float())


def test_a_loaded_export_saves_with_its_card_and_a_config_free_of_the_training_machine(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(output_dir=str(run), ema_decay=0.9, lr=5e-4, cpu_threads=2, wandb="offline")
    checkpointed_run(run, config)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 8, "epoch": 0, "eval/fid": 12.5}) + "\n")
    for source, out in ((run, tmp_path / "from_run"), (tmp_path / "export", tmp_path / "from_export")):
        if source.name == "export":
            export_main([str(run), str(source)])
        VAEGAN.from_pretrained(source).save_pretrained(out)
        saved = json.loads((out / "config.json").read_text())
        assert saved["_class_name"] == "VAEGAN" and saved["_vaegan_dist_version"] == vaegan_dist.__version__
        assert not {"output_dir", "data_dir", "wandb", "resume", "cpu_threads", "lr"} & set(saved)
        assert str(tmp_path) not in (out / "config.json").read_text()
        results = {m["type"]: m["value"] for m in card_metadata(out)["model-index"][0]["results"][0]["metrics"]}
        assert results == {"fid": 12.5}
        assert "--lr 0.0005" in (out / "README.md").read_text()
    exported = VAEGAN.from_pretrained(tmp_path / "from_export")
    assert {p.dtype for p in exported.parameters()} == {torch.float32} and exported.weights_dtype == torch.float16
    assert (tmp_path / "from_export" / "README.md").read_text() == (tmp_path / "export" / "README.md").read_text()


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    """push_to_hub against a local double of the Hub's API: the repo it creates and the folder it uploads."""
    calls: dict = {}

    class FakeRepo:
        repo_id = "someone/vaegan-mnist"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return FakeRepo()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, {p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return "https://huggingface.co/someone/vaegan-mnist/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    m = model()
    assert m.push_to_hub("someone/vaegan-mnist").endswith("/commit/0")
    repo_id, files = calls["upload"]
    assert calls["create_repo"] == repo_id == "someone/vaegan-mnist"
    m.save_pretrained(tmp_path)
    assert set(files) == {"README.md", "config.json", "model.safetensors"}
    assert files["config.json"] == (tmp_path / "config.json").read_bytes()
    assert files["model.safetensors"] == (tmp_path / "model.safetensors").read_bytes()


def test_from_pretrained_honours_dtype_and_device_and_refuses_what_it_cannot(tmp_path):
    half = VAEGAN.from_pretrained(REPO / "pretrained", torch_dtype=torch.float16, device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert VAEGAN.from_pretrained(REPO / "pretrained", dtype=torch.float64).decoder.out[1].weight.dtype == torch.float64
    with pytest.raises(TypeError, match="does not take device_map"):
        VAEGAN.from_pretrained(REPO / "pretrained", device_map="auto")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VAEGAN.from_pretrained(str(tmp_path / "typo" / "model"))


def test_inference_builds_no_autograd_graph():
    model = VAEGAN.from_pretrained(REPO / "pretrained")
    images = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert not images.requires_grad and not model.encode(images)[0].requires_grad
    assert not model.reconstruct(images).requires_grad


@pytest.mark.parametrize("command", ["train", "sample", "eval", "export", "report"])
def test_every_command_has_version(command, capsys):
    import importlib

    from vaegan_dist import __version__

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"vaegan_dist.cli.{command}").main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip().endswith(__version__)
