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

import os
from typing import Any

import torch

from meshplan.checkpoint.manifest import is_finite_number, is_number
from meshplan.errors import CheckpointError, shown, shown_path


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
