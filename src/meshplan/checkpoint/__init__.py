"""Checkpoints that outlive their layout, and whole Hugging Face models out of any of them.

- ``save_training_state`` / ``load_training_state``: what the Lightning strategies and
  ``meshplan.accelerator()`` use to save and resume, in any layout (sharded.py).
- ``export``: a checkpoint -> a Hugging Face model directory, streamed (export.py).
- ``latest_checkpoint``: the newest complete checkpoint in a folder, to resume after a crash.
- ``save_pretrained`` / ``consolidated_state_dict``: whole weights of a live model (pretrained.py).
"""

from meshplan.checkpoint.export import export
from meshplan.checkpoint.manifest import is_complete, latest_checkpoint, read_manifest
from meshplan.checkpoint.pretrained import consolidated_state_dict, save_pretrained
from meshplan.checkpoint.sharded import CheckpointReader, load_training_state, save_training_state
from meshplan.errors import CheckpointError

__all__ = [
    "CheckpointError", "CheckpointReader", "consolidated_state_dict", "export", "is_complete", "latest_checkpoint",
    "load_training_state", "read_manifest", "save_pretrained", "save_training_state",
]
