"""`meshplan finetune`: fine-tune a pretrained transformer under any recipe and front end."""

from meshplan.finetune.errors import FinetuneError
from meshplan.finetune.job import FinetuneJob

__all__ = ["FinetuneError", "FinetuneJob"]
