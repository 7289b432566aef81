"""The manifest of a checkpoint (``meshplan-checkpoint.json``), checked before any value in it is used.

The manifest lists the checkpoint's files and their sizes, where each tensor is stored, the
aliases of tied tensors, the models (for export) and the optimizers' param groups. Checkpoints
travel (downloads, shared filesystems), so every entry is checked by type and by what it may
point at before it is used: a file only under a plain name that ``files`` lists, inside the
checkpoint, a regular file (never through a symbolic link) of the listed size; an alias or an
optimizer parameter only a tensor of the same checkpoint. Every refusal is a CheckpointError
naming the checkpoint and the entry.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from meshplan.checkpoint.tensor_files import close_all, open_tensor_files, read_exactly
from meshplan.errors import CheckpointError, shown, shown_key, shown_path

MANIFEST = "meshplan-checkpoint.json"
FORMAT = "meshplan-checkpoint"
VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` names a file directly inside a directory: no separator, no ``..``, no NUL,
    and one the filesystem can be asked about (a lone surrogate from JSON's ``\\ud800`` cannot be encoded)."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not os.path.isabs(name)):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def _read_limited(checkpoint: Path, name: str, limit: int) -> bytes:
    """The bytes of the regular file ``name`` inside ``checkpoint``, opened without following a link; at most ``limit``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(checkpoint / name, flags)
    except FileNotFoundError:
        raise CheckpointError(
            f"{shown_path(checkpoint)} is not a complete meshplan checkpoint: {name} is missing (a save that did not "
            f"finish leaves none)."
        ) from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {name} cannot be opened as a regular file "
                              f"({error.strerror or error}); a symbolic link is never followed.") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {name} is not a regular file.")
        if status.st_size > limit:
            raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {name} has {status.st_size} bytes, more than the "
                                  f"{limit} meshplan reads.")
        buffer = bytearray(status.st_size)
        if not read_exactly(descriptor, buffer, 0):
            raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {name} shrank while it was read, or cannot be read.")
        return bytes(buffer)
    finally:
        os.close(descriptor)


def load_manifest_json(path: Path) -> Any:
    """The JSON value in the manifest of the checkpoint ``path``, not yet checked; a CheckpointError if there is none."""
    raw = _read_limited(path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{shown_path(path / MANIFEST)} is not valid JSON: {shown(str(error))}.") from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint, checked; a CheckpointError naming what is missing or wrong otherwise.

    Every entry is checked by type before any value is used (``_check_manifest``), and every file
    it lists must be a regular file of the size it gives, directly inside the checkpoint (looked
    at with lstat: a symbolic link is refused, never followed). ``aliases``, ``models``,
    ``optimizers`` and ``adapters`` are ``{}`` when the manifest has none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {shown_path(path)}.")
    if not path.is_dir():
        raise CheckpointError(
            f"{shown_path(path)} is a file, not a meshplan checkpoint directory; meshplan strategies do not load "
            f"pickled checkpoints (they could run arbitrary code)."
        )
    manifest = load_manifest_json(path)
    _check_manifest(path, manifest)
    for optional in ("aliases", "models", "optimizers", "adapters"):
        manifest.setdefault(optional, {})
    _check_files(path, manifest["files"])
    return manifest


def _manifest_error(path: Path, entry: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {shown_path(path)}: manifest entry {entry} {problem}.")


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a number a float can hold, not NaN or infinite."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_manifest(path: Path, manifest: Any) -> None:
    """Checks every entry meshplan reads by type and by what it may point at (a file of ``files``, a key of ``tensors``)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or type(manifest.get("version")) is not int \
            or manifest["version"] != VERSION:
        raise CheckpointError(f"{shown_path(path / MANIFEST)} is not a version-{VERSION} meshplan checkpoint manifest.")
    if not is_finite_number(manifest.get("saved_at")):
        raise _manifest_error(path, "saved_at", f"is {shown(manifest.get('saved_at'))}, not a finite number")
    for name, least in (("step", 0), ("world_size", 1)):
        value = manifest.get(name, least)
        if type(value) is not int or value < least:
            raise _manifest_error(path, name, f"is {shown(value)}, not an integer of at least {least}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _manifest_error(path, "files", f"is {shown(files)}, not an object of file names and sizes")
    for name, size in files.items():
        if not is_plain_name(name):
            raise _manifest_error(path, f"files[{shown(name)}]", "is not a plain file name inside the checkpoint")
        if type(size) is not int or size < 0:
            raise _manifest_error(path, f"files[{shown(name)}]", f"is {shown(size)}, not a size in bytes")
    tensors = _checked_object(path, manifest, "tensors", required=True)
    for key, file in tensors.items():
        if not isinstance(file, str) or file not in files:
            raise _manifest_error(path, f"tensors[{shown(key)}]", f"names {shown(file)}, not a file of the manifest's files")
    for alias, target in _checked_object(path, manifest, "aliases").items():
        if alias in tensors:  # a second tensor of one name: export would write it twice
            raise _manifest_error(path, f"aliases[{shown(alias)}]", "names a tensor the checkpoint stores itself")
        if not isinstance(target, str) or target not in tensors:
            raise _manifest_error(path, f"aliases[{shown(alias)}]",
                                  f"names {shown(target)}, not a tensor of this checkpoint")
    for name, entries in _checked_object(path, manifest, "models").items():
        for index, entry in enumerate(_checked_list(path, f"models[{shown(name)}]", entries)):
            where = f"models[{shown(name)}][{index}]"
            _check_fields(path, where, entry, {"prefix": str, "class": str, "config": dict})
    for name, entry in _checked_object(path, manifest, "adapters").items():
        _check_adapter_entry(path, f"adapters[{shown(name)}]", entry, tensors)
    for name, groups in _checked_object(path, manifest, "optimizers").items():
        for index, group in enumerate(_checked_list(path, f"optimizers[{shown(name)}]", groups)):
            where = f"optimizers[{shown(name)}][{index}]"
            _check_fields(path, where, group, {"hyperparameters": dict, "params": list})
            stray = [key for key in group["params"] if not isinstance(key, str) or key not in tensors]
            if stray:
                raise _manifest_error(path, f"{where}['params']",
                                      f"holds {shown(stray[0])}, not a tensor of this checkpoint")


def _check_adapter_entry(path: Path, where: str, entry: Any, tensors: dict[str, str]) -> None:
    """A model's peft adapters: ``frozen`` (a fingerprint string) and ``peft_models``, each with a ``prefix``,
    an ``adapter`` name, its ``config`` (an object with a ``peft_type``) and ``weights`` (adapter-file key ->
    a tensor of this checkpoint)."""
    _check_fields(path, where, entry, {"frozen": str, "peft_models": list})
    for index, model in enumerate(entry["peft_models"]):
        inner = f"{where}['peft_models'][{index}]"
        _check_fields(path, inner, model, {"prefix": str, "adapter": str, "config": dict, "weights": dict})
        if not isinstance(model["config"].get("peft_type"), str):
            raise _manifest_error(path, f"{inner}['config']['peft_type']", f"is {shown(model['config'].get('peft_type'))}, "
                                  f"not a peft method's name")
        for file_key, key in model["weights"].items():
            if not isinstance(key, str) or key not in tensors:
                raise _manifest_error(path, f"{inner}['weights'][{shown(file_key)}]", f"names {shown(key)}, not a tensor "
                                      f"of this checkpoint")


def _checked_object(path: Path, manifest: dict[str, Any], name: str, required: bool = False) -> dict[str, Any]:
    value = manifest.get(name) if required or name in manifest else {}
    if not isinstance(value, dict):
        raise _manifest_error(path, name, f"is {shown(value)}, not an object")
    return value


def _checked_list(path: Path, where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _manifest_error(path, where, f"is {shown(value)}, not a list")
    return value


def _check_fields(path: Path, where: str, value: Any, fields: dict[str, type]) -> None:
    if not isinstance(value, dict):
        raise _manifest_error(path, where, f"is {shown(value)}, not an object")
    for field, kind in fields.items():
        if not isinstance(value.get(field), kind):
            what = {dict: "an object", list: "a list", str: "a string"}[kind]
            raise _manifest_error(path, f"{where}[{field!r}]", f"is {shown(value.get(field))}, not {what}")


def _check_files(path: Path, files: dict[str, int]) -> None:
    """Each listed file must be a regular file of its listed size (lstat: a link is refused, its target never looked at)."""
    torn = []
    for name, size in files.items():
        try:
            status = os.lstat(path / name)
        except FileNotFoundError:
            torn.append(f"{shown_key(name)} is missing")
            continue
        except (OSError, ValueError) as error:  # ValueError (UnicodeError too): a name the OS cannot be given
            raise CheckpointError(
                f"checkpoint {shown_path(path)}: {shown_key(name)} cannot be inspected "
                f"({getattr(error, 'strerror', None) or type(error).__name__})."
            ) from None
        if stat.S_ISLNK(status.st_mode):
            raise CheckpointError(f"checkpoint {shown_path(path)}: {shown_key(name)} is a symbolic link; meshplan reads only "
                                  f"regular files inside a checkpoint and never follows a link out of it.")
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"checkpoint {shown_path(path)}: {shown_key(name)} is not a regular file.")
        if status.st_size != size:
            torn.append(f"{shown_key(name)} has {status.st_size} bytes, the manifest says {size}")
    if torn:
        more = f"; and {len(torn) - 3} more" if len(torn) > 3 else ""
        raise CheckpointError(f"checkpoint {shown_path(path)} is torn: {'; '.join(torn[:3])}{more}.")


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose files are all there."""
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The most recent complete checkpoint directly inside ``directory``, or None.

    Partial saves (hidden folders) and folders without a manifest are passed over; a checkpoint
    that cannot be read (torn, or with a manifest or tensor header that does not check out) is
    skipped with a warning that names it and says why, so after a crash this is the checkpoint
    to resume from. A checkpoint that was being replaced when the process died is found in its
    ``.NAME.replaced`` folder. Checkpoints are ordered by the training step they were saved at,
    then by the time they were published.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in sorted(directory.iterdir()):
        # A ".NAME.replaced" folder is a complete checkpoint whose replacement was cut short.
        hidden = path.name.startswith(".") and not path.name.endswith(".replaced")
        if hidden or not path.is_dir() or not os.path.lexists(path / MANIFEST):
            continue
        try:
            manifest = read_manifest(path)
            close_all(open_tensor_files(path, manifest).values())  # only checked here
        except CheckpointError as error:
            warnings.warn(f"latest_checkpoint skips {shown_path(path)}: {error}", stacklevel=2)
            continue
        found.append((manifest.get("step", 0), manifest["saved_at"], str(path)))
    return max(found)[2] if found else None
