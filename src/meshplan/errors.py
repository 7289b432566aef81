"""The errors meshplan raises, and how their messages show the values they name.

Values in error messages often come from files meshplan did not write (recipes, checkpoints),
so every value shown is cut to about SHOWN_LENGTH characters, at a bounded cost, and keeps the
message on one line.
"""

from __future__ import annotations

import math
import os
import reprlib
import sys
from typing import Any


class PlanError(ValueError):
    """An invalid parallel layout, raised before any collective starts.

    The message names the offending field, the value it was given and what would be valid, so
    that a user can fix the layout without reading meshplan's source.
    """


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written: incomplete, torn, unsafe, or not meshplan's.

    The message is one line that names the checkpoint, the file or entry and what is wrong.
    """


class _Repr(reprlib.Repr):
    """reprlib's bounded repr, with tensors described by dtype and shape (their own repr spans lines)."""

    def repr1(self, value: Any, level: int) -> str:
        if _is_tensor(value):
            return described_tensor(value)
        return super().repr1(value, level)


def _is_tensor(value: Any) -> bool:
    # torch is imported only where a tensor may be shown: recipes' errors need none.
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(value)


def described_tensor(tensor: Any, device: bool = False) -> str:
    """A tensor for a message, by its dtype (and ``device``) and shape: its values say nothing useful there."""
    where = f"{tensor.device.type} " if device else ""
    return f"a {where}{tensor.dtype} tensor of shape {_REPR.repr(list(tensor.shape))}"


# Values in error messages come from users' files too: each is cut to about this many characters.
SHOWN_LENGTH = 80
_REPR = _Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, SHOWN_LENGTH, SHOWN_LENGTH
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, on one line and cut to about SHOWN_LENGTH characters with "...".

    Bounded in cost as well as length: only the first few items of the first few levels of a
    container are looked at, an integer too long for ``repr`` is described by its size, and a
    tensor by its dtype and shape. A line break left in any value's text (another type's repr)
    is escaped, so the message stays one line.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # a long integer nested in a container; a repr that recurses
        text = f"<a {type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH - 3] + "..."


def shown_key(key: Any) -> str:
    """A key, option, file or tensor name for an error message: as it is when a short printable string, else ``shown``."""
    return key if isinstance(key, str) and len(key) <= SHOWN_LENGTH and key.isprintable() else shown(key)


def shown_path(path: str | os.PathLike) -> str:
    """A path the user gave, for an error message: as it is (so it can be copied) when printable, else its repr."""
    text = str(path)
    return text if text.isprintable() else repr(text)
