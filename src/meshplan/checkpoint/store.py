"""Writing a checkpoint: the state files, the hidden partial folder, the atomic publish, deleting.

A meshplan checkpoint is a directory::

    meshplan-checkpoint.json                  manifest: files and their sizes, tensors, models, optimizers
    tensors-00000-of-00002.safetensors        whole (unsharded) tensors, each written by one rank
    tensors-00001-of-00002.safetensors
    state.pt                                  the front end's own state (loops, schedulers, counters)
    rank-00000.pt ...                         per-process state (random number generators)

Tensors are stored whole, keyed by name, so any layout can read them back. Nothing in it is
unpickled: tensors are safetensors, and the ``.pt`` files are read with ``weights_only=True``.
A save writes into a hidden sibling folder and renames it into place once the manifest is
written, so a checkpoint is either complete or invisible; only folders meshplan wrote are ever
deleted.

Reading one trusts none of its bytes: the manifest is checked in manifest.py, the tensor files
in tensor_files.py (which also writes them), the ``.pt`` files here (``load_safe_object``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from meshplan.checkpoint.manifest import FORMAT, MANIFEST, VERSION, load_manifest_json
from meshplan.checkpoint.tensor_files import open_member
from meshplan.errors import CheckpointError, shown, shown_key, shown_path


def plain_data(value: Any) -> Any:
    """``value`` with mappings made plain dicts (Lightning's AttributeDict, for one), so it loads without code."""
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if type(value) is tuple:
        return tuple(plain_data(item) for item in value)
    return value


def check_safe_object(obj: Any, what: str) -> bytes:
    """``obj`` serialized by torch.save; a CheckpointError if loading it back would need unpickling code."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{what} holds an object that could only be loaded by unpickling code, which meshplan checkpoints "
            f"refuse: {_first_line(error)}. Keep checkpointed state to numbers, strings, lists, dicts and tensors."
        ) from None
    return buffer.getvalue()


def save_safe_object(obj: Any, path: Path, what: str) -> None:
    """torch.save of plain data (dicts, lists, numbers, strings, tensors), refused if loading it would need unpickling code."""
    data = check_safe_object(obj, what)
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def load_safe_object(checkpoint: Path, name: str, size: int) -> Any:
    """The plain data in the ``.pt`` file ``name`` of ``checkpoint`` (``size`` bytes, as its manifest says).

    Only an archive as torch.save writes it is read: its records stored uncompressed, so loading
    costs no more memory than the file's size, then torch.load with ``weights_only=True``: plain
    data and tensors only, never arbitrary objects.
    """
    with os.fdopen(open_member(checkpoint, name, size), "rb") as file:
        try:
            records = zipfile.ZipFile(file).infolist()
        except Exception as error:  # zipfile raises several types on a malformed archive
            raise CheckpointError(
                f"checkpoint {shown_path(checkpoint)}: {shown_key(name)} is not an archive written by torch.save "
                f"({shown(str(error))}); meshplan never unpickles a checkpoint's files, it loads them with "
                f"weights_only=True."
            ) from None
        if any(record.compress_type != zipfile.ZIP_STORED for record in records) or sum(r.file_size for r in records) > size:
            raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {shown_key(name)} holds compressed records, which "
                                  f"torch.save never writes; refused.")
        file.seek(0)
        try:
            return torch.load(file, weights_only=True, map_location="cpu")
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {shown_path(checkpoint)}: {shown_key(name)} holds objects that loading would have to unpickle by "
                f"running code; refused (torch.load(weights_only=True): {shown(_first_line(error))})."
            ) from None


def _first_line(error: Exception) -> str:
    """The telling line of an error: torch's weights-only refusals name the global they refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (telling or lines or [type(error).__name__])[0]


# ---------------------------------------------------------------- saving: partial folders, publishing, deleting


def partial_path(final: Path) -> Path:
    """The hidden folder a save writes into before it is published as ``final``."""
    return final.parent / f".{final.name}.partial"


def replaced_path(final: Path) -> Path:
    """The hidden folder a previous checkpoint at ``final`` is moved to while its replacement is published."""
    return final.parent / f".{final.name}.replaced"


def check_replaceable(final: Path) -> None:
    """Refuses to save over a directory that holds something other than a meshplan checkpoint, or where an
    earlier save left a hidden ``.NAME.partial`` or ``.NAME.replaced`` folder that holds something meshplan
    did not write (meshplan would have to delete it)."""
    if final.is_file() and not final.is_symlink():
        raise CheckpointError(f"{final} is a file; a meshplan checkpoint is a directory: remove it or save elsewhere.")
    problem = _removal_problem(final) if final.is_dir() and not final.is_symlink() and any(final.iterdir()) else None
    if problem is not None:
        raise CheckpointError(
            f"{final} is a directory that holds something other than a meshplan checkpoint ({problem}); saving there "
            f"would replace its contents. Save to a new or empty directory."
        )
    for leftover in (partial_path(final), replaced_path(final)):
        problem = _removal_problem(leftover) if os.path.lexists(leftover) else None
        if problem is not None:
            raise CheckpointError(f"{shown_path(leftover)} is in the way of saving {final}: {problem}. meshplan deletes only "
                                  f"what it wrote; remove it, then save again.")


def prepare_partial(final: Path) -> Path:
    """Clears what an interrupted save of ``final`` left behind and creates the folder to write into.

    A leftover ``.NAME.partial`` is deleted only if it holds nothing but files meshplan writes; anything
    else is a CheckpointError naming it (``check_replaceable`` finds this on every rank first).
    """
    partial = partial_path(final)
    if os.path.lexists(partial) and not delete_checkpoint(partial):
        raise CheckpointError(f"{shown_path(partial)} is left from an earlier save of {final} and {_removal_problem(partial)}; "
                              f"meshplan deletes only what it wrote: remove it, then save again.")
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, final: Path, sizes: dict[str, int], manifest: dict[str, Any]) -> None:
    """Writes the manifest and renames ``partial`` to ``final``.

    ``sizes`` are the sizes of the tensor files as their writers measured them (on another node,
    a stat here could be stale); the other files are rank 0's own. Until the rename the
    checkpoint is invisible. A previous checkpoint at ``final`` is moved aside to
    ``.NAME.replaced`` first and deleted last; ``latest_checkpoint`` still finds it there if
    the process dies in between.
    """
    files = {path.name: path.stat().st_size for path in sorted(partial.iterdir())}
    manifest = dict(manifest, format=FORMAT, version=VERSION, saved_at=time.time(), files={**files, **sizes})
    staged = partial / (MANIFEST + ".tmp")
    with open(staged, "w") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, partial / MANIFEST)
    if final.is_symlink() or final.is_file():
        final.unlink()
    replaced = replaced_path(final)
    if final.exists():
        if os.path.lexists(replaced) and not delete_checkpoint(replaced):
            raise CheckpointError(f"{shown_path(replaced)} {_removal_problem(replaced)}; meshplan deletes only what it wrote: "
                                  f"remove it, then save again (the new checkpoint is in {shown_path(partial)}).")
        os.rename(final, replaced)
    os.rename(partial, final)
    if os.path.lexists(replaced) and not delete_checkpoint(replaced):
        warnings.warn(f"meshplan kept {shown_path(replaced)}, the checkpoint {final} replaced: {_removal_problem(replaced)}.",
                      stacklevel=2)
    _fsync_directory(final.parent)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# The names of the files meshplan writes into a checkpoint (and its hidden partial and replaced folders).
_WRITTEN_NAMES = re.compile(r"tensors-\d+-of-\d+\.safetensors|rank-\d+\.pt|state\.pt|"
                            + re.escape(MANIFEST) + r"(\.tmp)?")
_HIDDEN_FOLDER = re.compile(r"\..+\.(partial|replaced)")


def delete_checkpoint(path: Path) -> bool:
    """Deletes ``path`` if it is a folder meshplan wrote, and says whether it did.

    That is a directory (not a symbolic link) holding only files meshplan writes, and either a
    manifest (a checkpoint, even a torn one) or a hidden ``.NAME.partial`` or ``.NAME.replaced``
    name (what a save leaves behind). Anything else is left where it is: False, for the caller to
    say so. ``_removal_problem`` says why.
    """
    if _removal_problem(path) is not None:
        return False
    shutil.rmtree(path)
    return True


def discard_checkpoint(path: Path, context: str = "") -> None:
    """Removes an old checkpoint as ``delete_checkpoint`` may; anything else there is kept, with a warning saying why.

    What ModelCheckpoint's ``save_top_k``, Accelerate's ``total_limit`` and finetune's pruning
    call: a training run does not stop over a folder it may not delete. ``context`` starts the
    warning (say, "total_limit: ").
    """
    if not os.path.lexists(path):
        return
    problem = _removal_problem(path)
    if problem is None:
        shutil.rmtree(path)
        return
    warnings.warn(f"{context}meshplan kept {shown_path(path)} instead of removing it: it is not a meshplan checkpoint "
                  f"directory ({problem}); only those are deleted.", stacklevel=3)


def _removal_problem(path: Path) -> str | None:
    """Why ``path`` is not a folder meshplan wrote (None if it is one)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return "it is not a directory" if not os.path.islink(path) else "it is a symbolic link"
        names = os.listdir(path)
    except OSError as error:
        return f"it cannot be inspected ({error.strerror or error})"
    foreign = [name for name in names if not _WRITTEN_NAMES.fullmatch(name) or not _is_regular(path / name)]
    if foreign:
        listed = ", ".join(shown(name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        return f"it holds {listed}, which meshplan does not write"
    if _HIDDEN_FOLDER.fullmatch(path.name):
        return None
    try:
        manifest = load_manifest_json(path)
    except CheckpointError:
        return f"it holds no readable {MANIFEST}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not a meshplan manifest"
    return None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


