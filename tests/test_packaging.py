"""The wheel a user installs with `pip install .` holds everything the default job reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_default_data_and_the_catalogue(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("meshplan-*.whl"))).namelist())
    for data in ("reviews-train.csv", "reviews-test.csv"):
        assert f"meshplan/data/{data}" in names, f"the wheel lacks meshplan/data/{data}: `meshplan finetune` has no default data"
    assert "meshplan/catalogue/zero3.yaml" in names
