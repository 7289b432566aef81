"""Each process's random number generators (Python, NumPy, torch CPU and CUDA), saved with a checkpoint.

Dropout masks depend on them: a resumed run draws the same masks as the uninterrupted one only
if every process's generators continue from where they were when the checkpoint was written.
A checkpoint's ``rank-*.pt`` is untrusted: ``saved_random_states`` checks every state it holds
before the front end loads anything, so ``set_random_states`` never fails half-way.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy
import torch

from meshplan.checkpoint.sharded import CheckpointReader, rank_file
from meshplan.checkpoint.state_checks import state_error
from meshplan.errors import described_tensor, shown

_MT_WORDS = 624  # the Mersenne Twister's state, in 32-bit words, for Python's and NumPy's generators


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


def saved_random_states(reader: CheckpointReader, rank: int) -> dict[str, Any] | None:
    """The generator states ``rank`` saved in the checkpoint, all checked; None when that rank did not exist then.

    A state is refused (a CheckpointError naming the file and the entry) unless it has the types
    ``random_states`` writes and the generator it is for accepts it: each is tried on a scratch
    generator of its kind, never on the process's own, so nothing is changed yet.
    """
    states = reader.rank_state(rank)
    if states is None:
        return None
    checks: dict[str, Callable[[Any], str | None]] = {"python": _python_problem, "numpy": _numpy_problem,
                                                      "torch": _torch_problem}
    if "cuda" in states:
        checks["cuda"] = _cuda_problem
    for entry, check in checks.items():
        problem = check(states[entry]) if entry in states else "is missing"
        if problem is not None:
            raise state_error(reader.path, rank_file(rank), entry, problem)
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Puts back the generators ``random_states`` saved (as ``saved_random_states`` returns them: checked)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    numpy.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _python_problem(state: Any) -> str | None:
    """``random.getstate()``: (3, 624 words and a position, the cached Gaussian or None)."""
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        return f"is {shown(state)}, not (version, state, gauss) as random.getstate() gives"
    version, internal, gauss = state
    if type(version) is not int or version != 3:
        return f"[0] is {shown(version)}, not 3 (the version random.getstate() gives)"
    words_ok = (isinstance(internal, (tuple, list)) and len(internal) == _MT_WORDS + 1
                and all(type(word) is int and 0 <= word < 2**32 for word in internal))
    if not words_ok or not internal[-1] <= _MT_WORDS:
        return f"[1] is {shown(internal)}, not {_MT_WORDS} 32-bit words and a position of at most {_MT_WORDS}"
    if gauss is not None and type(gauss) is not float:
        return f"[2] is {shown(gauss)}, not a float or None"
    return _refused_by(lambda: random.Random().setstate((version, tuple(internal), gauss)))


def _numpy_problem(state: Any) -> str | None:
    """``numpy.random.get_state()`` with its keys as a tensor: ("MT19937", 624 words, position, has_gauss, gauss)."""
    if not isinstance(state, (tuple, list)) or len(state) != 5:
        return f"is {shown(state)}, not the 5 items of numpy.random.get_state()"
    kind, keys, position, has_gauss, gauss = state
    if kind != "MT19937":
        return f"[0] is {shown(kind)}, not 'MT19937'"
    if not torch.is_tensor(keys) or keys.dtype != torch.uint32 or tuple(keys.shape) != (_MT_WORDS,):
        return f"[1] is {_described(keys)}, not a torch.uint32 tensor of {_MT_WORDS} words"
    if type(position) is not int or not 0 <= position <= _MT_WORDS:
        return f"[2] is {shown(position)}, not a position from 0 to {_MT_WORDS}"
    if type(has_gauss) is not int or has_gauss not in (0, 1):
        return f"[3] is {shown(has_gauss)}, not 0 or 1"
    if type(gauss) is not float:
        return f"[4] is {shown(gauss)}, not a float"
    return _refused_by(lambda: numpy.random.RandomState().set_state((kind, keys.numpy(), position, has_gauss, gauss)))


def _torch_problem(state: Any) -> str | None:
    """``torch.get_rng_state()``: the CPU generator's bytes, which torch.set_rng_state checks for size and validity."""
    size = torch.get_rng_state().numel()
    if not _is_byte_state(state) or state.numel() != size:
        return f"is {_described(state)}, not a CPU torch.uint8 tensor of {size} bytes as torch.get_rng_state() gives"
    return _refused_by(lambda: torch.Generator().set_state(state))


def _cuda_problem(state: Any) -> str | None:
    """``torch.cuda.get_rng_state()``: bytes on the CPU; where CUDA is there, tried on a scratch CUDA generator."""
    if not _is_byte_state(state):
        return f"is {_described(state)}, not a CPU torch.uint8 tensor as torch.cuda.get_rng_state() gives"
    if not torch.cuda.is_available():
        return None  # set_random_states does not set it
    return _refused_by(lambda: torch.Generator(device="cuda").set_state(state))


def _is_byte_state(state: Any) -> bool:
    return (torch.is_tensor(state) and state.dtype == torch.uint8 and state.device.type == "cpu" and state.dim() == 1
            and state.is_contiguous())


def _described(value: Any) -> str:
    """A tensor by its device, dtype and shape (a generator state must be on the CPU); anything else as ``shown``."""
    return described_tensor(value, device=True) if torch.is_tensor(value) else shown(value)


def _refused_by(attempt: Callable[[], Any]) -> str | None:
    """What the generator said when given the state (on a scratch generator), or None if it took it."""
    try:
        attempt()
    except (RuntimeError, ValueError, TypeError, OverflowError) as error:
        return f"is refused by the generator ({shown(str(error))})"
    return None

