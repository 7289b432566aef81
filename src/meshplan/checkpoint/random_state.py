"""Each process's random number generators (Python, NumPy, torch CPU and CUDA), saved with a checkpoint.

Dropout masks depend on them: a resumed run draws the same masks as the uninterrupted one only
if every process's generators continue from where they were when the checkpoint was written.
"""

from __future__ import annotations

import random
from typing import Any

import numpy
import torch


def random_states() -> dict[str, Any]:
    """This process's random number generators, as plain data and tensors."""
    kind, keys, position, has_gauss, gauss = numpy.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device only: layouts differ in devices
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Puts back the generators ``random_states`` saved."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    numpy.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
