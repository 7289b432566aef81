"""Checks of what a checkpoint holds, before any of it is set into a live object.

``state.pt`` (the front end's own state) and ``rank-*.pt`` (each process's random number
generators) load as plain data without running code, but what they hold is as untrusted as the
manifest: a crafted value must be refused where meshplan reads it, not fail far from the cause
(or, set as an attribute, change what a live object is). The front ends check every entry they
read or hand on before anything is loaded, and raise ``state_error``: a CheckpointError naming
the checkpoint, the file and the entry. What a library does with its own part of the state
(Lightning's loop and callback states) is checked only as far as its type.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch

from meshplan.checkpoint.manifest import is_finite_number, is_number
from meshplan.errors import SHOWN_LENGTH, CheckpointError, shown, shown_key, shown_path


def state_error(checkpoint: str | os.PathLike, file: str, entry: str, problem: str) -> CheckpointError:
    """The CheckpointError for ``entry`` of the state file ``file``; ``problem`` says what is wrong.

    A ``problem`` that starts with ``[`` names a place inside the entry and is joined to it.
    """
    joiner = "" if problem.startswith("[") else " "
    return CheckpointError(f"checkpoint {shown_path(checkpoint)}: {file} entry {entry}{joiner}{problem}.")


def is_count(value: Any) -> bool:
    """Whether ``value`` is a non-negative int (not a bool): a step, an epoch, a counter."""
    return type(value) is int and value >= 0


def count_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a step, epoch or counter, or None."""
    return None if is_count(value) else f"is {shown(value)}, not a non-negative integer"


def kind_problem(value: Any, kind: type) -> str | None:
    """What is wrong with ``value`` where a ``kind`` (dict, list, str) is expected, or None."""
    return None if isinstance(value, kind) else f"is {shown(value)}, not a {kind.__name__}"


def like_problem(value: Any, current: Any, owner: str) -> str | None:
    """What is wrong with ``value`` (from a checkpoint) in place of ``current`` (the live object's own), or None.

    ``value`` must be of the kind ``current`` is: a bool for a bool (or for None: an unset flag),
    a number for a number (a finite one where ``current`` is finite), a string for a string, a
    list or tuple of as many items, a dict with no key that ``current`` lacks (a key that is
    missing keeps its value), a tensor of the same dtype and shape, or a number for a tensor of
    one element; items are checked likewise. The problem starts with where inside ``value`` it
    is (``[0]``, ``['base_lrs']``) and says what ``owner`` ("the optimizer") holds.
    """
    theirs = f"as {owner}'s is"
    if isinstance(current, bool) or current is None:
        allowed = isinstance(value, bool) or (current is None and value is None)
        wanted = "a bool or null" if current is None else "a bool"
        return None if allowed else f"is {shown(value)}, not {wanted} {theirs}"
    if torch.is_tensor(current):
        return _tensor_problem(value, current, owner)
    if is_number(current):
        if not is_number(value):
            return f"is {shown(value)}, not a number {theirs}"
        return None if is_finite_number(value) or not is_finite_number(current) else f"is {shown(value)}, not a finite number"
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(current):
            return f"is {shown(value)}, not a list of {len(current)} values {theirs}"
        pairs = enumerate(zip(value, current))
        return _first_problem((f"[{index}]", like_problem(item, now, owner)) for index, (item, now) in pairs)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            return f"is {shown(value)}, not a dict {theirs}"
        stray = next((key for key in value if key not in current), None)
        if stray is not None:
            return f"[{shown(stray)}] is not an entry {owner} has"
        return _first_problem((f"[{shown(key)}]", like_problem(item, current[key], owner)) for key, item in value.items())
    if isinstance(current, str):
        return None if isinstance(value, str) else f"is {shown(value)}, not a string {theirs}"
    return f"is of a type ({type(current).__name__}) meshplan does not restore"


def _tensor_problem(value: Any, current: torch.Tensor, owner: str) -> str | None:
    theirs = f"as {owner}'s is"
    if torch.is_tensor(value):
        if value.dtype == current.dtype and value.shape == current.shape:
            return None
        return (f"is a {value.dtype} tensor of shape {shown(list(value.shape))}, not {current.dtype} of shape "
                f"{list(current.shape)} {theirs}")
    if current.numel() != 1:
        return f"is held in a tensor of {current.numel()} elements, which meshplan does not restore"
    if not current.is_floating_point() and not (type(value) is int and -2**63 <= value < 2**63):
        return f"is {shown(value)}, not an integer {theirs}"
    return like_problem(value, current.item(), owner)


def _first_problem(problems: Any) -> str | None:
    """The first problem of ``(place, problem)`` pairs, with its place put before it."""
    for place, problem in problems:
        if problem is not None:
            return place + ("" if problem.startswith("[") else " ") + problem
    return None


def is_plain_scalar(value: Any) -> bool:
    """A number, bool, None or short string: what another torch version may add to or drop from an
    object's state (an optimizer's hyperparameter, a scheduler's ``verbose``) without changing what
    the state means, so that an entry this torch lacks may be skipped rather than refused."""
    return value is None or isinstance(value, bool) or is_number(value) or (isinstance(value, str) and len(value) <= SHOWN_LENGTH)


def without_stray_scalars(saved: Any, current: Any) -> tuple[Any, list[Any]]:
    """``saved`` without its top-level keys that ``current`` (the live object's state) lacks and whose
    values are plain scalars, and those keys; ``saved`` itself when either is not a dict.

    A scheduler's state from another torch version holds such keys (``verbose``, stored by torch
    2.2 to 2.6); the rest of ``saved`` is then checked with ``like_problem``, which refuses any other
    stray key (torch's ``load_state_dict`` would set it as an attribute).
    """
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return saved, []
    stray = [key for key, value in saved.items() if key not in current and is_plain_scalar(value)]
    return {key: value for key, value in saved.items() if key not in stray}, stray


def warn_skipped(checkpoint: str | os.PathLike, file: str, skipped: list[tuple[str, list[Any]]], owner: str) -> None:
    """One warning for every entry (``(entry, keys)``) whose plain-scalar keys ``owner`` lacks and are ignored."""
    if not skipped:
        return
    listed = "; ".join(f"{entry}: {', '.join(shown_key(key) for key in keys[:5])}{' ...' if len(keys) > 5 else ''}"
                       for entry, keys in skipped[:3])
    warnings.warn(f"checkpoint {shown_path(checkpoint)}: {file} holds entries {owner} does not have ({listed}"
                  f"{'; ...' if len(skipped) > 3 else ''}); they were saved by another torch version and are ignored.",
                  stacklevel=4)


# The ranges torch.amp.GradScaler's constructor checks: outside them its next update() divides by
# zero, grows or shrinks the scale the wrong way, or never grows it.
_SCALER_RANGES = {
    "scale": (lambda value: math.isfinite(value) and value > 0, "a finite number above 0"),
    "growth_factor": (lambda value: value > 1, "above 1"),
    "backoff_factor": (lambda value: 0 < value < 1, "between 0 and 1"),
    "growth_interval": (lambda value: type(value) is int and value > 0, "an integer above 0"),  # steps between growths
}


def scaler_problem(saved: Any, current: dict[str, Any]) -> str | None:
    """What is wrong with ``saved`` for the gradient scaler whose state is ``current``, or None.

    An enabled scaler's ``load_state_dict`` reads every entry of its own state (a disabled one,
    whose state is empty, reads nothing): none may be missing, each is of the kind the scaler's
    own is (``like_problem``) and in the range torch's GradScaler constructor accepts.
    """
    if not current:
        return None
    problem = like_problem(saved, current, "the scaler")
    if problem is not None:
        return problem
    missing = [key for key in current if key not in saved]
    if missing:
        return f"[{missing[0]!r}] is missing"
    for key, (fits, wanted) in _SCALER_RANGES.items():
        if key in saved and is_number(saved[key]) and not fits(saved[key]):
            return f"[{key!r}] is {shown(saved[key])}, not {wanted} as torch's GradScaler requires"
    return None
