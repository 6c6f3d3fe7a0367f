"""Exports: the networks round-trip through safetensors and JSON, and the README's torch-only script runs them."""

from __future__ import annotations

import ast
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_config
from vaegan_dist.hub.model import export_networks
from vaegan_dist.hub.network_files import ExportError, load_networks, portable_settings
from vaegan_dist.model.networks import build_models


def fresh_networks(config):
    torch.manual_seed(1)
    encoder, decoder, _ = build_models(config)
    return encoder, decoder


def test_float32_export_round_trips_exactly(tmp_path):
    config = tiny_config(latent_dim=3)
    encoder, decoder = fresh_networks(config)
    export_networks(encoder, decoder, config, tmp_path, dtype=torch.float32)
    loaded_config, loaded_encoder, loaded_decoder = load_networks(tmp_path)
    assert portable_settings(loaded_config) == portable_settings(config)
    assert not loaded_encoder.training and not loaded_decoder.training
    for original, loaded in ((encoder, loaded_encoder), (decoder, loaded_decoder)):
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_default_export_is_float16_on_disk_and_float32_when_loaded(tmp_path):
    config = tiny_config()
    encoder, decoder = fresh_networks(config)
    export_networks(encoder, decoder, config, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.float16}
    _, _, loaded = load_networks(tmp_path)
    for key, value in decoder.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    assert {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items()
            if not k.startswith("_")} == portable_settings(config)


def test_unloadable_directories_get_one_line_errors(exported, tmp_path):
    with pytest.raises(ExportError, match=r"holds no config\.json: pass a checkpoint or export directory"):
        load_networks(tmp_path / "missing")
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match=r"cannot load the encoder from .*model.safetensors"):
        load_networks(broken)
    mismatched = shutil.copytree(exported, tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "latent_dim": config["latent_dim"] + 1}))
    with pytest.raises(ExportError, match=r"cannot load the encoder .* does not match config\.json"):
        load_networks(mismatched)


def readme_script() -> str:
    """The documentation's Python block that reads pretrained/model.safetensors (docs/evaluation.md)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "evaluation.md").read_text(), flags=re.DOTALL)
    (script,) = [block for block in blocks if "pretrained/model.safetensors" in block]
    return script


def test_readme_script_generates_the_decoders_digits_with_torch_and_safetensors_only(exported, tmp_path,
                                                                                     monkeypatch):
    script = readme_script()
    imported = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"json", "torch", "torch.nn.functional", "safetensors.torch"}
    assert len([line for line in script.splitlines() if line.strip()]) <= 10

    shutil.copytree(exported, tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(script, namespace)

    config, _, decoder = load_networks(exported)
    z = torch.randn(64, config.latent_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(namespace["digits"], decoder(z))
    pgm = (tmp_path / "digits.pgm").read_bytes()
    assert pgm.startswith(b"P5 224 224 255\n") and len(pgm) == len(b"P5 224 224 255\n") + 224 * 224
