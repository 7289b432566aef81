"""The wheel a user installs with `pip install .` holds everything the default job reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel with pip

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_default_data_and_the_catalogue(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source))
    wheel = next((tmp_path / "dist").glob("meshplan-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("reviews-train.csv", "reviews-test.csv"):
        assert f"meshplan/data/{data}" in names, f"the wheel lacks meshplan/data/{data}: `meshplan finetune` has no default data"
    assert "meshplan/catalogue/zero3.yaml" in names
    # Installed (not editable) and imported from elsewhere, the package finds its default data and recipes.
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "installed"), str(wheel))
    probe = ("import meshplan.finetune.data as data, meshplan.recipes as recipes; "
             "splits = data.load_splits('reviews'); print(data.__file__, len(splits['train']), len(splits['test']), "
             "len(recipes.catalogue()))")
    printed = _run(sys.executable, "-c", probe, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed")})
    module, train, test, recipes = printed.split()
    assert module.startswith(str(tmp_path / "installed"))  # the installed copy, not the checkout
    assert (int(train), int(test)) == (1200, 300) and int(recipes) >= 9


def _run(*command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}"
    return result.stdout
