"""A spawn probe that imports nothing heavy itself: what a worker's imports read from its environment."""

from __future__ import annotations

import os


def environment_as_imported(name: str) -> tuple[str | None, bool]:
    """The variable ``name`` in this worker's os.environ, and HF_HUB_OFFLINE as huggingface_hub read it when imported."""
    import huggingface_hub.constants

    return os.environ.get(name), huggingface_hub.constants.HF_HUB_OFFLINE


def was_imported_before_the_call(module: str) -> bool:
    """Whether ``module`` was already imported when this worker started running the call (a fork server preloaded it)."""
    import sys

    return module in sys.modules
