"""What a user installs: one version, the type marker and the MNIST licence shipped, every dependency pinned."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

import vaegan_dist
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vaegan_dist.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", vaegan_dist.__version__)


def test_every_dependency_is_pinned_in_the_constraints_file():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    requirements = [*PYPROJECT["project"]["dependencies"],
                    *(r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra)]
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()
        assert pins.get(name), f"{name} has no pin in constraints.txt"


def test_the_wheel_ships_py_typed_and_the_mnist_licence(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    if result.returncode and "No module named" in result.stderr:
        pytest.skip(f"cannot build a wheel here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("vaegan_dist-*.whl")
    assert wheel.name.startswith(f"vaegan_dist-{vaegan_dist.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vaegan_dist/py.typed", "vaegan_dist/data/mnist_idx/LICENSE.md",
            "vaegan_dist/evaluation/classifier.safetensors", "vaegan_dist/data/mnist_idx/train-images-idx3-ubyte.gz",
            "vaegan_dist/cli/train.py", "vaegan_dist/training/step.py"} <= names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and "Apache License" in (REPO / "LICENSE").read_text()
    licence = " ".join((REPO / "vaegan_dist/data/mnist_idx/LICENSE.md").read_text().split())
    assert "Creative Commons Attribution-Share Alike 3.0" in licence and "LeCun" in licence
