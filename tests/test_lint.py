"""The code passes the linter configured in pyproject.toml ([tool.ruff]): ruff, in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    # --no-cache: ruff would otherwise write .ruff_cache into the checkout.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                             "src", "tests", "scripts", "examples", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff found problems (fix them, or run `ruff check --fix`):\n{result.stdout}{result.stderr}"
