"""`meshplan finetune`: fine-tune a pretrained transformer under any recipe and front end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshplan.finetune.errors import FinetuneError

if TYPE_CHECKING:
    from meshplan.finetune.job import FinetuneJob

__all__ = ["FinetuneError", "FinetuneJob"]


def __getattr__(name: str) -> Any:
    """``FinetuneJob`` on first use: its module imports transformers and datasets, which the CLI's
    checks of ``--output`` must not wait for."""
    if name == "FinetuneJob":
        from meshplan.finetune.job import FinetuneJob

        return FinetuneJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
